"""Engine options shared by ``dmc generate`` and ``dmc bench``."""

from __future__ import annotations

import argparse
import pathlib


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory (DMC or plain Llama/Mistral/Qwen2/Qwen3)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + generation (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences decoded together")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None, help="page pool size, overriding the above")
    parser.add_argument("--vanilla", action="store_true", help="run a DMC model uncompressed (every token appends)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--eviction", choices=["h2o", "tova"], default=None,
                        help="the fixed-budget eviction baselines (spec §8), run on the uncompressed model (a plain "
                             "model, or a DMC one with --vanilla); needs --eviction-budget")
    parser.add_argument("--eviction-budget", type=int, default=None,
                        help="slots kept per (layer, sequence, KV head); DMC's slot count at CR c over n tokens is "
                             "ceil(n / c)")
    parser.add_argument("--eviction-recent", type=int, default=None,
                        help="H2O's protected recent window (default: half the budget)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    if not (pathlib.Path(args.model) / "config.json").is_file():
        raise ValueError(f"{args.model} is not a Hugging Face model directory (no config.json)")
    kv = None if args.kv_cache_memory_gib is None else int(args.kv_cache_memory_gib * 2**30)
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=kv, vanilla=args.vanilla,
                cuda_graphs=not args.no_cuda_graphs, eviction=_eviction_policy(args))


def _eviction_policy(args: argparse.Namespace):
    """The EvictionPolicy of --eviction/--eviction-budget/--eviction-recent, or None (ValueError if
    they do not go together; EvictionPolicy checks the numbers)."""
    from ..baselines.eviction import EvictionPolicy

    if args.eviction is None:
        for flag, value in (("--eviction-budget", args.eviction_budget), ("--eviction-recent", args.eviction_recent)):
            if value is not None:
                raise ValueError(f"{flag} needs --eviction h2o|tova")
        return None
    if args.eviction_budget is None:
        raise ValueError("--eviction needs --eviction-budget N (slots kept per layer, sequence and KV head)")
    if args.eviction_recent is not None and args.eviction != "h2o":
        raise ValueError("--eviction-recent is H2O's recent window; TOVA has none")
    return EvictionPolicy(args.eviction, budget=args.eviction_budget, recent=args.eviction_recent)
