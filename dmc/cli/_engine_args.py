"""Engine options shared by ``dmc generate``, ``dmc bench`` and ``dmc serve``, and checks shared with ``dmc eval``."""

from __future__ import annotations

import argparse
import pathlib


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory (DMC or plain Llama/Mistral/Qwen2/Qwen3)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + generation in tokens, >= 2 (default: the model's context)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences decoded together")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of the GPU's memory the engine may fill, weights included (CUDA only)")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="page pool size in GiB, overriding --gpu-memory-utilization (default on CPU: what "
                             "--max-num-seqs sequences can use, at most 40%% of the available memory and 4 GiB)")
    # "auto" and the names of dmc.engine.llm.KV_CACHE_DTYPES (spelt out: this parser does not import torch)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="page pool dtype: auto (the model dtype) or fp8 (e4m3 pages, a scale per layer and KV head, "
                             "1.0 unless --kv-scales: twice the pages in the same memory; the DMC window state "
                             "stays exact)")
    parser.add_argument("--kv-scales", default=None, metavar="PATH",
                        help="fp8 scales per (layer, KV head), a safetensors file saved by "
                             "LLM.calibrate_kv_scales(prompts).save(PATH) (needs --kv-cache-dtype fp8)")
    parser.add_argument("--prefill-chunk", type=int, default=4096,
                        help="most prompt tokens prefilled in one engine step (one forward; the chunks of several "
                             "prompts share it, a longer prompt goes over several steps)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens one engine step may process, decode and prefill together: decoding requests "
                             "count first, prefill gets the rest (at most --prefill-chunk), so arrivals cannot stall "
                             "running requests for long; >= --max-num-seqs (default: none, prefill gets "
                             "--prefill-chunk whatever decodes; dmc serve: 2048)")
    parser.add_argument("--prefill-delay-factor", type=float, default=0.0,
                        help="while requests run, a new prompt waits until the oldest waiting one has waited this many "
                             "times the last prefill forward's time (or the waiting prompts fill the step's budget), so "
                             "that one forward prefills several (small models: a forward's cost is mostly fixed); "
                             "0 = admit at once (default)")
    parser.add_argument("--vanilla", action="store_true", help="run a DMC model uncompressed (every token appends)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode without CUDA graphs (CUDA only)")
    parser.add_argument("--eviction", choices=["h2o", "tova", "snapkv"], default=None,
                        help="the fixed-budget eviction baselines (spec §8), run on the uncompressed model (a plain "
                             "model, or a DMC one with --vanilla); needs --eviction-budget")
    parser.add_argument("--eviction-budget", type=int, default=None,
                        help="slots kept per (layer, sequence, KV head); DMC's slot count at CR c over n tokens is "
                             "ceil(n / c)")
    parser.add_argument("--eviction-recent", type=int, default=None,
                        help="H2O's protected recent window (default: half the budget)")
    parser.add_argument("--eviction-window", type=int, default=None,
                        help="SnapKV's observation window: the last queries that score the slots, and the newest "
                             "slots always kept (default: 32, at most half the budget)")


def add_forced_cr_argument(parser: argparse.ArgumentParser) -> None:
    """``--forced-cr`` of ``dmc bench`` and ``dmc serve`` (benchmarks on random weights)."""
    parser.add_argument("--forced-cr", type=int, default=0,
                        help="benchmarks only: force every head to compress at this integer CR (random weights); "
                             "0 = off")


def check_forced_cr(forced_cr: int) -> None:
    if forced_cr < 0:
        raise ValueError(f"--forced-cr must be 0 (off) or an integer CR >= 1, got {forced_cr}")


def check_model_dir(model: str) -> None:
    """ValueError unless ``model`` is a directory holding a config.json."""
    if not (pathlib.Path(model) / "config.json").is_file():
        raise ValueError(f"{model} is not a Hugging Face model directory (no config.json)")


def check_device(device: str | None) -> None:
    """ValueError for a device torch does not know, or CUDA where there is none (before any loading)."""
    from ..engine.llm import resolve_device
    resolve_device(device)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The LLM keyword arguments of the engine flags; ValueError naming the flag for a value that cannot work."""
    check_model_dir(args.model)
    check_device(args.device)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2 (a prompt token and a generated one), got {args.max_model_len}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.kv_cache_memory_gib is not None and not args.kv_cache_memory_gib > 0:
        raise ValueError(f"--kv-cache-memory-gib must be > 0, got {args.kv_cache_memory_gib}")
    if not args.prefill_delay_factor >= 0:
        raise ValueError(f"--prefill-delay-factor must be >= 0 (0: off), got {args.prefill_delay_factor}")
    if args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_num_batched_tokens is not None and args.max_num_batched_tokens < args.max_num_seqs:
        raise ValueError(f"--max-num-batched-tokens must be >= --max-num-seqs ({args.max_num_seqs}): every decoding "
                         f"sequence takes one token of a step; got {args.max_num_batched_tokens}")
    if args.kv_scales is not None and args.kv_cache_dtype != "fp8":
        raise ValueError("--kv-scales are the scales of an fp8 cache: add --kv-cache-dtype fp8")
    kv = None if args.kv_cache_memory_gib is None else int(args.kv_cache_memory_gib * 2**30)
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=kv, vanilla=args.vanilla,
                cuda_graphs=not args.no_cuda_graphs, eviction=_eviction_policy(args),
                kv_cache_dtype=args.kv_cache_dtype, kv_scales=args.kv_scales, prefill_chunk=args.prefill_chunk,
                max_num_batched_tokens=args.max_num_batched_tokens, prefill_delay_factor=args.prefill_delay_factor)


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model directory raises for a bad directory (not a bug): caught by the commands
    and printed as one line (see :func:`describe_load_error`)."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


def describe_load_error(model: str, exc: BaseException) -> str:
    """One line for a failed model load: the error, and for unreadable weights what to do."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    kind = getattr(exc, "kind", None) or type(exc).__name__  # an engine process's error names its type
    if kind == "SafetensorError" or "safetensors" in message.lower():
        return (f"cannot read the weights in {model} ({message}): the file is truncated or corrupt; copy or save "
                "the model again")
    return f"cannot load the model in {model}: {message}"


def _eviction_policy(args: argparse.Namespace):
    """The EvictionPolicy of --eviction/--eviction-budget/--eviction-recent, or None (ValueError if
    they do not go together; EvictionPolicy checks the numbers)."""
    from ..baselines.eviction import METHOD_NAMES, EvictionPolicy

    if args.eviction is None:
        for flag, value in (("--eviction-budget", args.eviction_budget), ("--eviction-recent", args.eviction_recent),
                            ("--eviction-window", args.eviction_window)):
            if value is not None:
                raise ValueError(f"{flag} needs --eviction h2o|tova|snapkv")
        return None
    if args.eviction_budget is None:
        raise ValueError("--eviction needs --eviction-budget N (slots kept per layer, sequence and KV head)")
    if args.eviction_recent is not None and args.eviction != "h2o":
        raise ValueError(f"--eviction-recent is H2O's recent window; {METHOD_NAMES[args.eviction]} has none")
    if args.eviction_window is not None and args.eviction != "snapkv":
        raise ValueError(f"--eviction-window is SnapKV's observation window; {METHOD_NAMES[args.eviction]} has none")
    return EvictionPolicy(args.eviction, budget=args.eviction_budget, recent=args.eviction_recent,
                          window=args.eviction_window)


# --enable-prefix-caching, as a block of its own: the flag joins the parser and its keyword the engine's.
_add_engine_arguments, _engine_kwargs = add_engine_arguments, engine_kwargs


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:  # noqa: F811
    _add_engine_arguments(parser)
    parser.add_argument("--enable-prefix-caching", action="store_true",
                        help="keep the compressed state after each prompt's longest 64-token boundary, so that a "
                             "prompt starting with the same tokens (a chat's history) prefills only the rest; same "
                             "outputs; not with --eviction or --forced-cr (default: off)")


def engine_kwargs(args: argparse.Namespace) -> dict:  # noqa: F811
    return {**_engine_kwargs(args), "enable_prefix_caching": args.enable_prefix_caching}
