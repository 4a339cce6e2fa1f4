"""Where a decode step's time goes at large batch: the engine on the Llama-2-7B-shaped
benchmark model (benchmarks/throughput.py's ``build_model``, random bf16 weights, decisions forced to
CR r), one GPU.

For each (CR, batch): fill the batch (prompt ``--prompt-len`` tokens each, generation long enough
never to finish), then

- time ``--steps`` decode steps as the engine runs them (CUDA graphs on): wall ms per step;
- time the batch's captured decode graph alone, replayed back to back (CUDA events): the GPU's time per step
  with no host work between steps, so the step's wall time minus it is what the host adds (sampling's
  launch, postprocessing, scheduling, input copies; the replays advance the cache a few tokens);
- profile the same number of steps without CUDA graphs (``torch.profiler``, CUDA activity): GPU time
  per step by kernel group (weight GEMMs, DMC update, paged attention, allocator, sampling, the rest)
  and the host's share (wall − GPU busy).

Writes ``OUT/profile_decode.json`` and a Markdown section into ``OUT/../benchmarks.md``-style file
``OUT/profile_decode.md`` (GPU named, command recorded)::

    python benchmarks/profile_decode.py --out docs/results/engine_h200 [--configs 1:51 4:201 8:390]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

GROUPS = (  # kernel-name fragment -> group; first match wins (names are lower-cased)
    ("decode_update", "DMC update (Triton)"), ("delayed", "DMC update (Triton)"),
    ("attention_split", "paged attention (Triton)"), ("attention_reduce", "paged attention (Triton)"),
    ("gemm", "weight GEMMs"), ("gemv", "weight GEMMs"), ("cutlass", "weight GEMMs"), ("sm90", "weight GEMMs"),
    ("nvjet", "weight GEMMs"), ("cumsum", "allocator"), ("scan", "allocator"),
    ("softmax", "sampling / logits"), ("argmax", "sampling / logits"), ("topk", "sampling / logits"),
    ("sort", "sampling / logits"), ("multinomial", "sampling / logits"), ("exponential", "sampling / logits"),
    ("triton_", "norms / elementwise"),  # Inductor's kernels (triton_per_fused_..., triton_poi_fused_...)
    ("rms", "norms / elementwise"), ("elementwise", "norms / elementwise"), ("vectorized", "norms / elementwise"),
    ("reduce", "norms / elementwise"), ("index", "gather / scatter"), ("scatter", "gather / scatter"),
    ("gather", "gather / scatter"), ("copy", "copies"), ("memcpy", "copies"), ("memset", "copies"),
)


# Host-side waits for the GPU (a .item(), .tolist() or int() of a device tensor, or an explicit sync).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def group_of(name: str, groups=GROUPS) -> str:
    low = name.lower()
    return next((g for frag, g in groups if frag in low), "other")


def fill(llm, batch: int, prompt_len: int, steps: int) -> None:
    """Admit ``batch`` requests and step until all are decoding."""
    import dmc
    params = dmc.SamplingParams(max_tokens=10 * steps + 64, ignore_eos=True, temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        llm.add_request(torch.randint(3, 32000, (prompt_len,), generator=gen).tolist(), params)
    for _ in range(4 * batch + prompt_len):  # bounded: a batch that does not fit must not hang the run
        if len(llm.scheduler.running) >= batch and not llm.scheduler.waiting and not any(
                r.prefilling for r in llm.scheduler.running):
            return
        llm.step()
    raise SystemExit(f"only {len(llm.scheduler.running)} of {batch} requests run at once: the batch does not fit")


def timed_steps(llm, steps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def graph_replay(llm, batch: int):
    """The replay of the decode graph ``batch`` runs in (its static inputs as the last engine step left them:
    each replay decodes those rows once more, a token further into their cache)."""
    bucket = min(size for size in llm.runner.graph_buckets if size >= batch)
    return llm.runner.graphs[bucket].graph.replay


def graph_replay_ms(llm, batch: int, steps: int) -> float:
    """ms per replay of the decode graph, back to back on the GPU (CUDA events)."""
    from throughput import cuda_time
    return cuda_time(graph_replay(llm, batch), steps) * 1e3


def attention_alone_ms(llm, layers=(0, -1), iters: int = 20) -> dict:
    """The paged attention kernel called by itself on the engine's own cache (its pools, page tables and lens as
    the batch left them; random queries), ms per call at a few layers: set against the same kernel inside the
    step and against attention_sweep.py's synthetic cache of the same shape."""
    from throughput import cuda_time

    from dmc.kernels import triton_kernels
    cache = llm.cache
    rows = [r.row for r in llm.scheduler.running if not r.prefilling]
    seq_ids = torch.tensor(rows, dtype=torch.int32, device=cache.device)
    heads = cache.page_table.shape[2]
    group = llm.model.config.num_attention_heads // heads
    d = cache.k_pool.shape[-1]
    q = torch.randn(len(rows), heads * group, d, device=cache.device, dtype=llm.runner.model.dtype)
    def ms(k_pool, v_pool, table, lens, layer, k_scale, v_scale) -> float:
        return cuda_time(lambda: triton_kernels.paged_decode_attention(
            q, k_pool, v_pool, table, lens, seq_ids, layer, d ** -0.5, cache.layout.page_size, k_scale=k_scale,
            v_scale=v_scale), iters) * 1e3

    out = {}
    for layer in layers:
        layer = layer % cache.lens.shape[0]
        out[str(layer)] = ms(cache.k_pool, cache.v_pool, cache.page_table, cache.lens, layer, cache.k_scale,
                             cache.v_scale)
    # The first layer's pages copied into a pool of their own, each head's pages in one run, the table renumbered:
    # the same work on a compact layout.
    layer, size = 0, cache.layout.page_size
    lens = cache.lens[layer:layer + 1].clone()
    table = cache.page_table[layer:layer + 1].clone()
    used = torch.arange(table.shape[-1], device=cache.device) < (lens[..., None] + size - 1) // size
    ids = table[used].long()
    pools = [torch.cat([pool[:1], pool[ids]]) for pool in (cache.k_pool, cache.v_pool)]
    table[used] = torch.arange(1, ids.numel() + 1, dtype=table.dtype, device=cache.device)
    out["compact_0"] = ms(*pools, table, lens, 0, cache.k_scale[:1].contiguous(), cache.v_scale[:1].contiguous())
    out["mean_slots"] = float(cache.lens[:, seq_ids.long()].float().mean())
    return out


def profiled_steps(llm, steps: int, step=None, groups=GROUPS) -> dict:
    """Profile ``steps`` calls of ``step`` (default ``llm.step``): wall and GPU ms per step, GPU time by
    kernel group and the top kernels, host syncs per step."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            (step or llm.step)()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    table, groups = groups, {}
    kernels: dict[str, float] = {}
    syncs = 0
    for evt in prof.events():
        if evt.name in SYNC_EVENTS:
            syncs += 1
        elif evt.device_type == torch.autograd.DeviceType.CUDA:
            us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
            group = group_of(evt.name, table)
            groups[group] = groups.get(group, 0.0) + us
            kernels[evt.name] = kernels.get(evt.name, 0.0) + us
    gpu = sum(groups.values()) / steps / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": wall, "gpu_ms": gpu, "host_ms": max(wall - gpu, 0.0), "host_syncs": syncs / steps,
            "groups_ms": {g: v / steps / 1e3 for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[name[:90], v / steps / 1e3] for name, v in top]}


def label(row: dict) -> str:
    """The CR of a row, with ``+ fp8`` for fp8 pages."""
    return f"{row['cr']}" + (" + fp8" if row.get("kv_cache_dtype") == "fp8" else "")


def parse_config(spec: str) -> tuple[int, int, str]:
    """``CR:batch`` or ``CR:batch:fp8`` -> (CR, batch, kv_cache_dtype)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("auto", "fp8")):
        sys.exit(f"--configs: {spec!r} is not CR:batch or CR:batch:fp8")
    return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "auto"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/engine_h200")
    parser.add_argument("--configs", nargs="+", default=["1:51", "4:201", "8:390"],
                        help="CR:batch, or CR:batch:fp8 for fp8 KV pages (kv_cache_dtype='fp8')")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--label", default="", help="names this run in the report (e.g. before/after a change)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/profile_decode.py needs a CUDA GPU")
    import dmc
    from throughput import build_model, engine_mode, free_model
    model = build_model(dmc_model=True)
    rows = []
    for spec in args.configs:
        cr, batch, kv_cache_dtype = parse_config(spec)
        kwargs = engine_mode(cr)
        kwargs["kv_cache_dtype"] = kv_cache_dtype
        row = {"cr": cr, "batch": batch, "kv_cache_dtype": kv_cache_dtype, "prompt_len": args.prompt_len,
               "context": args.context}
        llm = dmc.LLM(model, max_model_len=args.context, max_num_seqs=batch, admission_margin=0.0,
                      progress=False, **kwargs)
        fill(llm, batch, args.prompt_len, args.steps)
        timed_steps(llm, 3)  # warm-up (graph capture, autotuning)
        row["graph_step_ms"] = timed_steps(llm, args.steps)
        row["graph_replay_ms"] = graph_replay_ms(llm, batch, args.steps)
        # The graph's kernels under the profiler (CUPTI sees the kernels a graph launches): their busy time
        # against the replays' span says how much of the graph's GPU time is gaps between kernels.
        row["graph"] = profiled_steps(llm, args.steps, step=graph_replay(llm, batch))
        row["attention_alone_ms"] = attention_alone_ms(llm)
        # The same batch, a few tokens on, eager (no graph bucket matches): what the profiler can see.
        llm.runner.graph_buckets = []
        timed_steps(llm, 2)
        row["eager"] = profiled_steps(llm, args.steps)
        del llm
        free_model()
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "label": args.label,
            "command": "python " + " ".join(sys.argv)}
    print(write_report(pathlib.Path(args.out), rows, meta, args.prompt_len))
    return 0


def write_report(out: pathlib.Path, rows: list[dict], meta: dict, prompt_len: int) -> str:
    """``OUT/profile_decode[_LABEL].json`` and ``.md`` for these rows; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    label_ = meta.get("label") or ""
    name = "profile_decode" + (f"_{label_}" if label_ else "")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    groups = list(dict.fromkeys(g for _, g in GROUPS))
    lines = [f"# Decode-step profile ({meta['gpu']}{', ' + label_ if label_ else ''})", "",
             f"Written by `{meta['command']}` (torch {meta['torch']}). Llama-2-7B shape, bf16, random weights, "
             f"decisions forced to CR r; prompt {prompt_len} tokens per sequence. Graph step: the engine as it "
             f"runs (CUDA graphs); graph GPU: its graph replayed back to back (no host work between steps); the rest: "
             f"the same steps eager under torch.profiler (GPU time per step by kernel group; host = wall − GPU busy; "
             f"host syncs: the host's waits for the GPU per step).", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["| CR | batch | graph step ms | graph GPU ms | eager wall ms | GPU ms | host ms | host syncs | "
              + " | ".join(groups) + " | other |", "|" + "---|" * (8 + len(groups) + 1)]
    for r in rows:
        e = r["eager"]
        cells = [f"{e['groups_ms'].get(g, 0.0):.2f}" for g in groups]
        replay = f"{r['graph_replay_ms']:.2f}" if "graph_replay_ms" in r else "-"
        lines.append(f"| {label(r)} | {r['batch']} | {r['graph_step_ms']:.2f} | {replay} | {e['wall_ms']:.2f} | "
                     f"{e['gpu_ms']:.2f} | {e['host_ms']:.2f} | {e.get('host_syncs', 0):.0f} | " + " | ".join(cells)
                     + f" | {e['groups_ms'].get('other', 0.0):.2f} |")
    graphed = [r for r in rows if "graph" in r]
    if graphed:
        lines += ["", "Inside the graph: its replays back to back under torch.profiler (span: wall ms per replay; "
                  "kernels: their busy ms; gaps: span − kernels), by kernel group:", "",
                  "| CR | batch | span ms | kernels ms | gaps ms | " + " | ".join(groups) + " | other |",
                  "|" + "---|" * (5 + len(groups) + 1)]
        for r in graphed:
            g = r["graph"]
            cells = [f"{g['groups_ms'].get(name, 0.0):.2f}" for name in groups]
            lines.append(f"| {label(r)} | {r['batch']} | {g['wall_ms']:.2f} | {g['gpu_ms']:.2f} | {g['host_ms']:.2f} | "
                         + " | ".join(cells) + f" | {g['groups_ms'].get('other', 0.0):.2f} |")
    alone = [r for r in rows if "attention_alone_ms" in r]
    if alone:
        from cost_model import slot_bytes
        from throughput import SHAPE
        lines += ["", "The paged attention kernel called alone on the engine's cache after those steps (random queries; "
                  "ms per layer, CUDA events), against inside the graph (its ms per step / layers):", "",
                  "| CR | batch | mean slots | alone, first layer | TB/s | alone, last layer | first layer, pages compacted | "
                  "in the graph, per layer |", "|---|---|---|---|---|---|---|---|"]
        for r in alone:
            a = r["attention_alone_ms"]
            layers = [k for k in a if k.isdigit()]
            inside = r.get("graph", {}).get("groups_ms", {}).get("paged attention (Triton)")
            per_layer = f"{inside / (int(layers[-1]) + 1):.3f}" if inside is not None else "-"
            # the bytes one layer's attention reads: its slots' k and v (cost_model's slot bytes, all layers / L)
            layer_bytes = r["batch"] * a["mean_slots"] * slot_bytes(r["kv_cache_dtype"]) / SHAPE["num_hidden_layers"]
            tb_s = layer_bytes / (a[layers[0]] * 1e-3) / 1e12
            lines.append(f"| {label(r)} | {r['batch']} | {a['mean_slots']:.0f} | {a[layers[0]]:.3f} | {tb_s:.2f} | "
                         f"{a[layers[-1]]:.3f} | {a.get('compact_0', float('nan')):.3f} | {per_layer} |")
    for r in rows:
        lines += ["", f"Top kernels, CR {label(r)}, batch {r['batch']} (ms per step):", ""]
        lines += [f"- {v:.3f} `{k}`" for k, v in r["eager"]["top_kernels_ms"]]
        if "graph" in r:
            lines += ["", "Inside the graph:", ""] + [f"- {v:.3f} `{k}`" for k, v in r["graph"]["top_kernels_ms"]]
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


def report_from_log(log: str, out: str, meta: dict, prompt_len: int = 2048) -> str:
    """The report of a run cut short (e.g. by its time limit before the JSON was written): the rows it printed,
    one JSON line per finished config, in ``log``."""
    rows = [json.loads(line) for line in pathlib.Path(log).read_text().splitlines() if line.startswith('{"cr"')]
    return write_report(pathlib.Path(out), rows, meta, prompt_len)


if __name__ == "__main__":
    raise SystemExit(main())
