"""Engine throughput on one GPU: decode tokens/s against the compression ratio, prefill, decode attention, HF.

Model: Llama-2-7B shape (32 layers, 32 heads of 128, MLP 11008, vocab 32000), bf16, RANDOM
weights. Decisions are driven (``forced_period``): every head merges all tokens but every r-th,
so it compresses at exactly CR r; the kernels still read the decision channel. Parts:

- ``attention``: the paged split-K decode attention (Triton) on ragged per-head caches vs dense
  SDPA decode on a contiguous cache of the same bytes, in TB/s (also checked against the twin);
- ``prefill``: a 4K prompt through the engine's compressed prefill vs the stock model's SDPA
  forward (and the engine's vanilla prefill);
- ``engine``: prompt C/2 + generate C/2 for contexts C and CR r (r = 1 is the same engine with
  every token appending), the largest batch that fits, output tok/s over the last decode steps;
  ``--kv-cache-dtype fp8`` runs it over e4m3 pages (rows ``cr4-fp8``, beside the bf16 ``cr4`` ones);
- ``hf``: Hugging Face ``generate()`` of the stock model at 1K context, the largest batch that fits.

Rows accumulate in ``docs/results/throughput.json`` (``--resume`` skips rows already there, so
the run can be split over several calls); ``docs/benchmarks.md`` gets its "throughput" section.

    python benchmarks/throughput.py --parts attention prefill engine hf [--contexts 1024 2048 4096]
        [--kv-cache-dtype auto|fp8]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import sys
import time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dmc  # noqa: E402
from _report import write_section  # noqa: E402
from dmc.config import DMCConfig  # noqa: E402
from dmc.engine.bench import measure_throughput  # noqa: E402
from dmc.engine.cache import CacheLayout  # noqa: E402
from dmc.engine.llm import KV_CACHE_DTYPES  # noqa: E402
from dmc.hf.convert import dmc_config_from  # noqa: E402
from dmc.hf.modeling import FAMILIES  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**SHAPE, attn_implementation="sdpa")


def build_model(dmc_model: bool) -> torch.nn.Module:
    """Random Llama-2-7B-shaped weights, bf16, built on the GPU."""
    torch.manual_seed(0)
    config = llama_config()
    cls = transformers.LlamaForCausalLM
    if dmc_model:
        config = dmc_config_from(config, DMCConfig(window=12), FAMILIES[0])
        cls = FAMILIES[0].dmc_causal_lm_class
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def free_model() -> None:
    """Return the memory of objects the caller just deleted."""
    gc.collect()
    torch.cuda.empty_cache()


def cuda_time(fn, iters: int) -> float:
    """Mean seconds per call, CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


# ----------------------------------------------------------------------------------- attention
def bench_attention() -> list[dict]:
    from dmc.kernels import reference, triton_kernels

    rows = []
    seqs, heads, d, p = 64, 32, 128, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    for kind in ("ragged", "uniform"):
        if kind == "ragged":
            lens = torch.randint(256, 1793, (1, seqs + 1, heads), device="cuda", generator=g, dtype=torch.int32)
        else:
            lens = torch.full((1, seqs + 1, heads), 1024, device="cuda", dtype=torch.int32)
        pages_per_head = math.ceil(2048 / p) + 1
        held = (lens.long() // p + 1)
        total = int(held.sum()) + 1
        k_pool = torch.randn(total, p, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v_pool = torch.randn(total, p, d, device="cuda", dtype=torch.bfloat16, generator=g)
        table = torch.zeros(1, seqs + 1, heads, pages_per_head, dtype=torch.int32, device="cuda")
        ids = torch.randperm(total - 1, device="cuda", generator=g).int() + 1  # scattered pages
        m = torch.arange(pages_per_head, device="cuda")
        table[m < held[..., None]] = ids[: int(held.sum())]
        q = torch.randn(seqs, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
        seq_ids = torch.arange(seqs, device="cuda", dtype=torch.int32)
        scale = d ** -0.5
        run = lambda: triton_kernels.paged_decode_attention(q, k_pool, v_pool, table, lens, seq_ids, 0, scale, p)  # noqa: E731
        ref = reference.paged_decode_attention_ref(q, k_pool, v_pool, table, lens, seq_ids, 0, scale, p)
        err = float((run().float() - ref.float()).abs().max())
        seconds = cuda_time(run, 50)
        used = lens[0, :seqs].long()
        bytes_read = int(used.sum()) * d * 2 * 2
        mean = int(used.float().mean())
        kc = torch.randn(seqs, heads, mean, d, device="cuda", dtype=torch.bfloat16, generator=g)
        vc = torch.randn_like(kc)
        qd = q[:, :, None]
        dense = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(qd, kc, vc, scale=scale), 50)
        rows.append({"part": "attention", "config": f"paged-{kind}", "rows": seqs * heads,
                     "mean_len": float(used.float().mean()), "ms": seconds * 1e3, "tb_s": bytes_read / seconds / 1e12,
                     "dense_sdpa_tb_s": seqs * heads * mean * d * 4 / dense / 1e12, "max_abs_err_vs_twin": err})
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------------- prefill
def bench_prefill(length: int = 4096) -> list[dict]:
    rows = []
    ids = torch.randint(3, 32000, (1, length), device="cuda")
    stock = build_model(dmc_model=False)
    with torch.inference_mode():
        seconds = cuda_time(lambda: stock(ids, logits_to_keep=1, use_cache=False), 5)
    rows.append({"part": "prefill", "config": "hf-sdpa-causal", "tokens": length, "tok_s": length / seconds})
    print(rows[-1], flush=True)
    stock = None  # noqa: F841 - frees the weights
    free_model()
    model = build_model(dmc_model=True)
    prompt = ids[0].tolist()
    for name, kwargs in (("engine-dmc-cr4-sdpa", dict(forced_period=4, prefill_attention="sdpa")),
                         ("engine-dmc-cr4-flex", dict(forced_period=4, prefill_attention="flex")),
                         ("engine-vanilla", dict(vanilla=True, prefill_attention="sdpa"))):
        llm = dmc.LLM(model, max_model_len=length + 16, max_num_seqs=2, cuda_graphs=False, progress=False, **kwargs)

        def once():
            row = llm.cache.open_row()
            llm.runner.prefill(row, prompt, 0)
            llm.cache.close_row(row)

        seconds = cuda_time(once, 5)
        rows.append({"part": "prefill", "config": name, "tokens": length, "tok_s": length / seconds})
        print(rows[-1], flush=True)
        llm = None  # noqa: F841
        free_model()
    del model
    free_model()
    return rows


# ----------------------------------------------------------------------------------- engine
def max_seqs_for(context: int, cr: int, fixed_seq_bytes: int, page_bytes: int, rows: int) -> int:
    """The batch the free memory can hold at this CR (sizes the per-sequence tables only)."""
    free, total = torch.cuda.mem_get_info()
    budget = total * 0.9 - (total - free) - 6 * 2**30
    per_seq = rows * (math.ceil(context / cr / 16) + 2) * page_bytes + fixed_seq_bytes
    return max(1, min(1024, int(budget / per_seq)))


def engine_mode(cr: int) -> dict:
    """``dmc.LLM`` arguments that make the random-weight benchmark model run at CR ``cr``: every token appending
    (vanilla) at CR 1, decisions forced to the period ``cr`` above it."""
    return dict(vanilla=True) if cr == 1 else dict(forced_period=cr)


def engine_config(cr: int, kv_cache_dtype: str) -> str:
    """An engine row's config name: ``cr4``, or ``cr4-fp8`` over fp8 pages (so --resume keeps both)."""
    return f"cr{cr}" if kv_cache_dtype == "auto" else f"cr{cr}-{kv_cache_dtype}"


def engine_row(context: int, cr: int, kv_cache_dtype: str, max_num_seqs: int, result: dict) -> dict:
    return {"part": "engine", "config": engine_config(cr, kv_cache_dtype), "context": context, "cr": cr,
            "kv_cache_dtype": kv_cache_dtype, "max_num_seqs": max_num_seqs, **result}


def bench_engine(contexts: list[int], crs: list[int], done: set, kv_cache_dtype: str = "auto") -> list[dict]:
    rows = []
    model = build_model(dmc_model=True)
    layers, heads, d = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], 128
    element = 1 if kv_cache_dtype == "fp8" else 2  # bytes of a pool element (the rings stay bf16)
    for context in contexts:
        for cr in crs:
            key = ("engine", engine_config(cr, kv_cache_dtype), context)
            if key in done:
                continue
            fixed = CacheLayout(layers, heads, d, 0, 1, context, 12, cr == 1).sequence_bytes(torch.bfloat16)
            seqs = max_seqs_for(context, cr, fixed, 2 * 16 * d * element, layers * heads)
            kwargs = engine_mode(cr)
            # Decisions are forced, so the observed CR is exact: admit without a safety margin.
            llm = dmc.LLM(model, max_model_len=context, max_num_seqs=seqs, admission_margin=0.0, progress=False,
                          kv_cache_dtype=kv_cache_dtype, **kwargs)
            half = context // 2
            result = measure_throughput(llm, half, half, measure_steps=min(1024, half // 2), progress=False)
            rows.append(engine_row(context, cr, kv_cache_dtype, seqs, result.to_dict()))
            print(json.dumps(rows[-1]), flush=True)
            del llm
            free_model()
    del model
    free_model()
    return rows


# ----------------------------------------------------------------------------------- HF generate
def bench_hf(context: int = 1024, batches=(128, 96, 64, 48, 32)) -> list[dict]:
    """The largest batch of ``batches`` (tried in order) that generate() runs without running out of
    memory; the batches that did not fit are recorded with the row."""
    model = build_model(dmc_model=False)
    half = context // 2
    rows, too_big = [], []
    for batch in batches:
        ids = torch.randint(3, 32000, (batch, half), device="cuda")
        try:
            times = {}
            for new in (32, half):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                times[new] = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            print(f"hf generate: batch {batch} is out of memory", flush=True)
            too_big.append(batch)
            ids = None  # noqa: F841
            free_model()
            continue
        rows.append({"part": "hf", "config": "hf-generate", "context": context, "batch": batch, "cr": 1,
                     "tokens_per_s": batch * (half - 32) / (times[half] - times[32]),
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "out_of_memory_batches": too_big})
        print(rows[-1], flush=True)
        break
    del model
    free_model()
    return rows


# ----------------------------------------------------------------------------------- report
def report(rows: list[dict], gpu: str) -> str:
    lines = [f"## Engine throughput ({gpu}; `python benchmarks/throughput.py`)", "",
             "Llama-2-7B shape, bf16, random weights; decisions forced so that every head compresses at exactly "
             "CR r (α_t = 1 unless t % r == 0; the decode kernel still reads the decision channel). CR 1 is the "
             "same engine with every token appending. Prompt C/2 + generate C/2 tokens, greedy, the largest "
             "batch that fits; output tok/s over the last min(1024, C/4) decode steps. CUDA graphs on.", ""]
    engine = [r for r in rows if r["part"] == "engine"]
    stock = next((r for r in rows if r["part"] == "prefill" and r["config"] == "hf-sdpa-causal"), None)
    if engine:
        lines += ["| context | CR | KV dtype | batch | tok/s | vs CR 1 | step ms | realized CR | peak GiB | "
                  "KV pool GiB | prefill tok/s | vs stock SDPA prefill (one 4K prompt) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        kv = lambda r: r.get("kv_cache_dtype", "auto")  # noqa: E731 - rows from before the flag are bf16
        for r in sorted(engine, key=lambda r: (r["context"], kv(r), r["cr"])):
            base = next((b for b in engine if b["context"] == r["context"] and b["cr"] == 1 and kv(b) == kv(r)), None)
            bf16 = next((b for b in engine if b["context"] == r["context"] and b["cr"] == 1 and kv(b) == "auto"), None)
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            if bf16 is not None and bf16 is not base:  # fp8 rows: also against the bf16 engine's CR 1
                ratio += f" ({r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x bf16 CR 1)"
            vs_stock = f"{r['prefill_tokens_per_s'] / stock['tok_s']:.2f}" if stock else "- (run the prefill part)"
            lines.append(f"| {r['context']} | {r['cr']} | {kv(r)} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                         f"{ratio} | "
                         f"{r['step_ms']:.1f} | {r['realized_cr']:.2f} | {r['peak_memory_gib']:.1f} | "
                         f"{r['kv_pool_gib']:.1f} | {r['prefill_tokens_per_s']:,.0f} | {vs_stock} |")
        lines += ["", "Prefill tok/s: the engine's prefill phase of that run (every prompt of the wave, after a "
                  "warm-up prompt; batched: each step's prefill_chunk = 4096 tokens hold several prompts in one "
                  "forward), against the stock model's SDPA forward of one 4K prompt (the prefill part).", ""]
    hf = [r for r in rows if r["part"] == "hf"]
    for r in hf:
        base = next((b for b in engine if b["context"] == r["context"] and b["cr"] == 1), None)
        ratio = f" — the CR 1 engine is {base['tokens_per_s'] / r['tokens_per_s']:.2f}x faster" if base else ""
        oom = r.get("out_of_memory_batches") or []
        tried = f"; batch {', '.join(map(str, oom))} ran out of memory" if oom else ""
        lines.append(f"Hugging Face `generate()` (stock model, SDPA, DynamicCache) at {r['context']} context: "
                     f"{r['tokens_per_s']:,.0f} tok/s at batch {r['batch']} (decode steps only{tried}){ratio}.")
        lines.append("")
    att = [r for r in rows if r["part"] == "attention"]
    if att:
        lines += ["| decode attention | rows | mean length | ms | TB/s | dense SDPA TB/s (same mean, contiguous) | "
                  "max err vs twin |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['rows']} | {r['mean_len']:.0f} | {r['ms']:.3f} | {r['tb_s']:.2f} | "
                  f"{r['dense_sdpa_tb_s']:.2f} | {r['max_abs_err_vs_twin']:.1e} |" for r in att]
        lines.append("")
    pre = [r for r in rows if r["part"] == "prefill"]
    if pre:
        base = next((r for r in pre if r["config"] == "hf-sdpa-causal"), None)
        lines += ["| prefill (one 4K prompt) | tok/s | vs stock SDPA |", "|---|---|---|"]
        lines += [f"| {r['config']} | {r['tok_s']:,.0f} | "
                  f"{r['tok_s'] / base['tok_s']:.2f} |" if base else f"| {r['config']} | {r['tok_s']:,.0f} | - |"
                  for r in pre]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--parts", nargs="+", default=["attention", "prefill", "engine", "hf"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--crs", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--kv-cache-dtype", choices=["auto", *KV_CACHE_DTYPES], default="auto",
                        help="the engine part's page pools: auto (bf16) or fp8 (e4m3; rows named cr<r>-fp8)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    parser.add_argument("--hf-batches", nargs="+", type=int, default=[128, 96, 64, 48, 32],
                        help="batches tried for HF generate(), largest first (an OOM late in generation is slow)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/throughput.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    path = pathlib.Path(args.out) / "results" / "throughput.json"
    rows = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []
    done = {(r["part"], r["config"], r.get("context")) for r in rows}
    for part in args.parts:
        if part == "attention":
            new = bench_attention()
        elif part == "prefill":
            new = bench_prefill()
        elif part == "engine":
            new = bench_engine(args.contexts, args.crs, done, args.kv_cache_dtype)
        elif part == "hf":
            new = bench_hf(batches=args.hf_batches)
        else:
            sys.exit(f"unknown part {part!r}")
        keys = {(r["part"], r["config"], r.get("context")) for r in new}
        rows = [r for r in rows if (r["part"], r["config"], r.get("context")) not in keys] + new
        done |= keys
        meta = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                "command": " ".join(sys.argv)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        write_section(pathlib.Path(args.out) / "benchmarks.md", "throughput", report(rows, gpu))


if __name__ == "__main__":
    main()
