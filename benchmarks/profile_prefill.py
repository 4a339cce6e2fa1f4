"""Where an engine prefill step's time goes: the engine on the Llama-2-7B-shaped benchmark model
(benchmarks/throughput.py's ``build_model``, random bf16 weights, decisions forced to CR r), one GPU.

For each CR: queue ``--requests`` prompts of ``--prompt-len`` tokens, run one prefill step as warm-up
(FlexAttention and the pooling compile), then profile ``--steps`` of the engine's batched prefill steps
(``prefill_chunk`` tokens each, several prompts' chunks in one forward) under ``torch.profiler``: wall
and GPU ms per step, GPU time by kernel group, the top kernels and the host syncs per step. A step whose
GPU time is well under its wall time is waiting on the host (Python, launches, syncs); one more step runs with
CUDA's sync debug mode to name the lines where the host waits for the GPU.

Delayed merging: ``--merge-delay W`` gives the model merge_delay w = W (CR 1 is the vanilla engine, which keeps
no raw window: use CRs above 1); ``--per-segment`` turns the packing of first chunks off, so that every chunk runs
alone per layer (what a delayed model's prefill did before its first chunks were packed): a before/after pair
on one checkout. ``--tiny`` swaps in a small model (2 layers, hidden 256) and runs where there is no GPU (no
CUDA times then: wall ms and the top host ops), a smoke test of the script.

``--model DIR`` profiles a model directory instead (a real one: the original, or a DMC retrofit with its own
decisions; ``--crs`` is then ignored), its prompts random token ids of its vocabulary: where a small model's
prefill forward goes (host or GPU) at ``--prefill-chunk`` tokens a step.

Writes ``OUT/profile_prefill[_LABEL].json`` and ``.md`` (GPU named, command recorded)::

    python benchmarks/profile_prefill.py --out docs/results/engine_h200 [--crs 1 4] [--label before]
    python benchmarks/profile_prefill.py --crs 4 --merge-delay 32 --per-segment --label delay32-per-segment
    python benchmarks/profile_prefill.py --crs 4 --merge-delay 32 --label delay32-packed
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from profile_decode import GROUPS, profiled_steps  # noqa: E402

PREFILL_GROUPS = (  # kernel-name fragment -> group, before the decode step's groups; first match wins
    ("flash", "attention (SDPA flash)"), ("fmha", "attention (SDPA flash)"), ("triton_tem", "attention (Flex)"),
    ("flex", "attention (Flex)"), ("chunk_states", "DMC pooling (Triton)"), ("triton_", "other compiled (inductor)"),
) + GROUPS


def sync_sites(step, top: int = 12) -> list[list]:
    """Run ``step`` once with CUDA's sync debug mode on: where the host waited for the GPU, as
    ``[count, "file:line"]`` of the innermost frame in this project (or in torch where none is), most first."""
    import collections
    import traceback
    import warnings

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # only the sync debug mode's warnings, not others of the step
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
        ours = [f for f in frames if "/dmc/" in f.filename] or frames
        sites[f"{ours[-1].filename.split('/dmc/')[-1]}:{ours[-1].lineno} {ours[-1].line}"] += 1

    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [[n, site] for site, n in sites.most_common(top)]


# Where the host spends a prefill step (inclusive, nested sections overlap): (label, module path, attribute
# path). With no sync inside the forward the host runs ahead of the GPU, so these are its own costs.
HOST_SECTIONS = (
    ("forward_packed (attention, all)", "dmc.hf.attention", "DMCAttention.forward_packed"),
    ("q/k/v projections + norms", "dmc.hf.attention", "DMCAttention._heads"),
    ("decision channel", "dmc.core", "split_decision_channel"),
    ("decisions", "dmc.core", "inference_decisions"),
    ("packed first chunks (all)", "dmc.hf.attention", "DMCAttention._inference_packed"),
    ("  pooling of packed first chunks", "dmc.hf.attention", "DMCAttention._pool_first_chunks"),
    ("  packed commit (slot writes, window state)", "dmc.engine.runner", "commit_packed"),
    ("  packed delay-ring write", "dmc.engine.runner", "hold_packed"),
    ("chunk alone, delayed merging (all)", "dmc.hf.attention", "DMCAttention._attend_cached_delayed"),
    ("pooling (window terms, chunk states)", "dmc.hf.attention", "DMCAttention._pool_on_cache"),
    ("visible slots", "dmc.engine.cache", "_LayerView.visible_slots"),
    ("attention kernel (_attend)", "dmc.hf.attention", "DMCAttention._attend"),
    ("commit (slot writes, window state)", "dmc.engine.cache", "_LayerView.commit"),
    ("  page growth", "dmc.engine.cache", "PagedKVCache.grow"),
    ("  window state", "dmc.core", "next_window_state"),
    ("  set window state", "dmc.engine.cache", "PagedKVCache.set_window_state"),
    ("add + norm", "dmc.engine.layers", "DecodeOps.add_norm"),
    ("MLP", "dmc.engine.layers", "DecodeOps.mlp"),
)


def host_sections(step) -> list[list]:
    """Run ``step`` once with each of :data:`HOST_SECTIONS` wrapped in a host timer (no sync added):
    ``[[label, host ms, calls], ...]`` plus the whole step's wall ms (which includes the final wait)."""
    import importlib
    import time
    totals: dict[str, list] = {}
    patched = []

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cell = totals.setdefault(label, [0.0, 0])
                cell[0] += time.perf_counter() - t0
                cell[1] += 1
        return wrapper

    for label, module, attr in HOST_SECTIONS:
        owner = importlib.import_module(module)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__[name]
        patched.append((owner, name, original))
        setattr(owner, name, timed(label, original))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # (--tiny on a CPU)
    sync()
    try:
        t0 = time.perf_counter()
        step()
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    return [["whole step (wall)", wall, 1]] + [[label, totals[label][0] * 1e3, totals[label][1]]
                                                for label, _, _ in HOST_SECTIONS if label in totals]


def tiny_model(device) -> torch.nn.Module:
    """``--tiny``: a small Llama-shaped DMC model (2 layers, hidden 256, heads of 64), random weights, fp32 on a
    CPU and bf16 on a GPU: a smoke test of the script, not a measurement."""
    import transformers

    from dmc.config import DMCConfig
    from dmc.hf.convert import dmc_config_from
    from dmc.hf.modeling import FAMILIES

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    config = dmc_config_from(config, DMCConfig(window=12), FAMILIES[0])
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return FAMILIES[0].dmc_causal_lm_class(config).to(device=device, dtype=dtype).eval()


def cpu_steps(llm, steps: int, step) -> dict:
    """:func:`profile_decode.profiled_steps` without a GPU (``--tiny`` on a CPU): wall ms per step and the top
    ops by their own host time (no GPU times)."""
    import time

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps * 1e3
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return {"wall_ms": wall, "gpu_ms": 0.0, "host_ms": wall, "host_syncs": 0.0, "groups_ms": {},
            "top_kernels_ms": [[e.key[:90], e.self_cpu_time_total / steps / 1e3] for e in ops]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/engine_h200")
    parser.add_argument("--crs", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=12,
                        help="prompts queued (enough for the warm-up, the profiled steps and one sync-debug step)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per engine step (the engine's)")
    parser.add_argument("--label", default="", help="names this run in the report (e.g. before/after a change)")
    parser.add_argument("--merge-delay", type=int, default=0,
                        help="w of delayed merging (0: off; the default retrofit recipe uses 32); CR 1 keeps none")
    parser.add_argument("--per-segment", action="store_true",
                        help="no packing of first chunks: every chunk alone per layer (the 'before' of packing)")
    parser.add_argument("--tiny", action="store_true",
                        help="a small model instead of the 7B shape; runs without a GPU (smoke test)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a model directory instead of the 7B shape, with its own decisions (--crs ignored)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny or args.model):
        sys.exit("benchmarks/profile_prefill.py needs a CUDA GPU (or --tiny or a small --model: a smoke test)")
    import dataclasses

    import dmc
    from dmc.engine import runner
    from throughput import build_model, engine_mode, free_model
    if args.model:
        model = None
    elif args.tiny:
        model = tiny_model("cuda" if cuda else "cpu")
    else:
        model = build_model(dmc_model=True)
    if args.merge_delay and model is not None:
        model.set_dmc_config(dataclasses.replace(model.dmc_config, merge_delay=args.merge_delay))
    if args.per_segment:
        runner.pack_first_chunks = lambda *a, **k: None  # prefill_batch then runs every chunk alone
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for cr in ([None] if args.model else args.crs):
        kwargs = {} if cr is None else engine_mode(cr)
        llm = dmc.LLM(model if model is not None else args.model, max_model_len=args.context,
                      max_num_seqs=args.requests, admission_margin=0.0, prefill_chunk=args.prefill_chunk,
                      progress=False, **({} if cuda else {"device": "cpu"}), **kwargs)
        if cr is None:
            cr = "model" if llm.vanilla else f"model (DMC, target CR {llm.dmc.target_cr or '?'}, w = {llm.cache.layout.delay_width})"
        else:
            assert llm.cache.layout.delay_width == (0 if cr == 1 else args.merge_delay)
        gen = torch.Generator().manual_seed(0)
        params = dmc.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
        vocab = llm.model.config.vocab_size
        for _ in range(args.requests):
            llm.add_request(torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist(), params)
        llm._prefill_step()  # warm-up: compiles this length's attention
        sync()
        profiled = (profiled_steps(llm, args.steps, step=llm._prefill_step, groups=PREFILL_GROUPS) if cuda
                    else cpu_steps(llm, args.steps, llm._prefill_step))
        row = {"cr": cr, "prompt_len": args.prompt_len, "prefill_chunk": llm.prefill_chunk,
               "merge_delay": llm.cache.layout.delay_width, "packed": not args.per_segment, **profiled}
        row["tokens_per_s"] = llm.prefill_chunk / row["wall_ms"] * 1e3
        if llm.scheduler.waiting and cuda:  # one more step, unprofiled, naming where the host waits for the GPU
            row["sync_sites"] = sync_sites(llm._prefill_step)
        if llm.scheduler.waiting:  # and one timing the host's sections
            row["host_sections_ms"] = host_sections(llm._prefill_step)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
        free_model()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name() if cuda else "no GPU (CPU)", "torch": torch.__version__,
            "label": args.label, "command": "python " + " ".join(sys.argv), "merge_delay": args.merge_delay,
            "first_chunks": "per segment" if args.per_segment else "packed",
            "model": args.model or ("tiny" if args.tiny else "7B")}
    name = "profile_prefill" + (f"_{args.label}" if args.label else "")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    group_names = list(dict.fromkeys(g for _, g in PREFILL_GROUPS))
    lines = [f"# Prefill-step profile ({meta['gpu']}{', ' + args.label if args.label else ''})", "",
             f"Written by `{meta['command']}` (torch {meta['torch']}). "
             + (f"Model `{args.model}` with its own decisions, bf16, prompts of random token ids"
                if args.model else
                ("Tiny model (smoke test: not a measurement)" if args.tiny else "Llama-2-7B shape, bf16")
                + ", random weights, decisions forced to CR r") + f", merge_delay w = {args.merge_delay} (CR > 1), first "
             f"chunks {meta['first_chunks']}; prompts of {args.prompt_len} tokens, each step one batched prefill "
             f"forward of prefill_chunk tokens (several prompts' chunks), under torch.profiler. Host = wall − GPU "
             f"busy; tok/s here is under the profiler (slower than unprofiled).", "",
             "| CR | wall ms | GPU ms | host ms | host syncs | tok/s | " + " | ".join(group_names) + " | other |",
             "|" + "---|" * (6 + len(group_names) + 1)]
    for r in rows:
        cells = [f"{r['groups_ms'].get(g, 0.0):.1f}" for g in group_names]
        lines.append(f"| {r['cr']} | {r['wall_ms']:.1f} | {r['gpu_ms']:.1f} | {r['host_ms']:.1f} | {r['host_syncs']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | " + " | ".join(cells) + f" | {r['groups_ms'].get('other', 0.0):.1f} |")
    for r in rows:
        lines += ["", f"Top kernels, CR {r['cr']} (ms per step):", ""]
        lines += [f"- {v:.3f} `{k}`" for k, v in r["top_kernels_ms"]]
        if r.get("sync_sites"):
            lines += ["", f"Where the host waited for the GPU, CR {r['cr']} (one more step, CUDA sync debug mode):", ""]
            lines += [f"- {n} `{site}`" for n, site in r["sync_sites"]]
        if r.get("host_sections_ms"):
            lines += ["", f"Host time by section, CR {r['cr']} (one more step, unprofiled; inclusive, nested "
                      "sections overlap; no sync added):", "", "| section | host ms | calls |", "|---|---|---|"]
            lines += [f"| {label} | {ms:.1f} | {calls} |" for label, ms, calls in r["host_sections_ms"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
