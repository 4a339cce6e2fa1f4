"""The paged split-K decode attention at the engine's large-batch shape, bf16 vs fp8 pages, swept over its
tile: one GPU.

Why: at 4K context, CR 4 with fp8 pages ran batch 397 at 56.6 ms a step on an H200, where bf16 at CR 8
(batch ~390, the same KV bytes) took 37.4 ms. The kernel loads a fixed number of *tokens* per iteration
(``ATTENTION_BLOCK_TOKENS``), so 1-byte elements put half the bytes in flight; this sweep says whether a
larger tile (``block_tokens``) or deeper pipelining (``num_stages``) recovers the bandwidth.

Each config times :func:`dmc.kernels.triton_kernels.paged_decode_attention` on one layer's ragged cache
(each of ``--shapes``: batch rows × ``--heads`` KV heads, MHA, head dim 128, lengths uniform in [L/2, 3L/2]
for the mean slots, pages scattered; by block_tokens × num_stages × num_warps, then by the split count) with CUDA events, and checks it against the twin
(:func:`dmc.kernels.reference.paged_decode_attention_ref`) on the first rows. Writes
``OUT/attention_sweep.json`` and ``OUT/attention_sweep.md`` (TB/s of the pool bytes read, GPU named)::

    python benchmarks/attention_sweep.py --out docs/results/engine_h200 [--shapes 397:896:fp8 201:896:bf16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_report  # noqa: E402
from throughput import cuda_time  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
# The split kernel's inner products: tensor-core dots (the engine's default), CUDA-core sums reduced over the
# tile's slots every iteration, or CUDA-core sums kept per slot row and reduced once (MHA only, both).
MODES = {"dot": {"use_dot": True}, "sum": {"use_dot": False, "defer_sums": False},
         "defer": {"use_dot": False, "defer_sums": True}}


def ragged_cache(batch: int, heads: int, mean_len: int, dtype: torch.dtype, page_size: int = 16, d: int = 128,
                 seed: int = 0, device: str = "cuda", q_dtype: torch.dtype = torch.bfloat16, pool_gib: float = 0.0,
                 contiguous: bool = False):
    """One layer's pools, page table and lens ``[1, batch + 1, heads]`` (row ``batch`` is the scratch row).
    ``pool_gib``: the k and v pools together at least this large, the used pages scattered over all of it (as in
    the engine, whose pools fill the GPU), else just the pages used. ``contiguous``: each head's pages one run,
    the heads one after another, instead of scattered."""
    g = torch.Generator(device=device).manual_seed(seed)
    lens = torch.randint(mean_len // 2, mean_len * 3 // 2 + 1, (1, batch + 1, heads), device=device, generator=g,
                         dtype=torch.int32)
    pages_per_head = math.ceil(int(lens.max()) / page_size) + 1
    held = lens.long() // page_size + 1
    used = int(held.sum()) + 1
    page_bytes = page_size * d * torch.tensor([], dtype=dtype).element_size()
    total = max(used, int(pool_gib * 2**30 / (2 * page_bytes)))
    k_pool = torch.empty(total, page_size, d, device=device, dtype=dtype)
    v_pool = torch.empty(total, page_size, d, device=device, dtype=dtype)
    table = torch.zeros(1, batch + 1, heads, pages_per_head, dtype=torch.int32, device=device)
    ids = torch.randperm(total - 1, device=device, generator=g).int() + 1  # scattered pages
    if contiguous:
        ids = torch.arange(1, total, device=device, dtype=torch.int32)
    filled = torch.cat([torch.zeros(1, dtype=torch.long, device=device), ids[: used - 1].long()])
    k_pool[filled] = torch.randn(used, page_size, d, device=device, generator=g).to(dtype)
    v_pool[filled] = torch.randn(used, page_size, d, device=device, generator=g).to(dtype)
    m = torch.arange(pages_per_head, device=device)
    table[m < held[..., None]] = ids[: int(held.sum())]
    q = torch.randn(batch, heads, d, device=device, generator=g).to(q_dtype)
    seq_ids = torch.arange(batch, device=device, dtype=torch.int32)
    return q, k_pool, v_pool, table, lens, seq_ids


def cuda_ms(fn) -> float:
    """Mean ms per call over 20 calls after a warm-up (throughput.py's CUDA-event timer)."""
    return cuda_time(fn, 20) * 1e3


def sweep(batch: int, heads: int, mean_len: int, blocks: list[int], stages: list[int | None], *,
          dtypes=tuple(DTYPES), device: str = "cuda", q_dtype: torch.dtype = torch.bfloat16,
          timer=cuda_ms, warps: list[int] = (4,), splits: list[int | None] = (None,),
          reads: list[torch.dtype | None] = (None,), modes: list[str] = ("dot",), pool_gib: float = 0.0,
          contiguous: bool = False) -> list[dict]:
    """One row per (pool dtype, block_tokens, num_stages, num_warps, num_splits): time (``timer(fn)`` ms) and
    the error vs the twin. ``q_dtype``: the queries' (the engine's model dtype; Triton's CPU interpreter only
    computes fp32 right). ``splits`` None: the engine's :func:`default_splits`. ``reads``: the dtypes fp8 pages are
    read in (None: the engine's :func:`fp8_read_dtype`); bf16 pools ignore it. ``modes``: the split kernel's inner
    products, :data:`MODES` (the CUDA-core ones need MHA). ``pool_gib``, ``contiguous``: :func:`ragged_cache`'s."""
    from dmc.kernels import reference, triton_kernels

    rows = []
    for name in dtypes:
        q, k_pool, v_pool, table, lens, seq_ids = ragged_cache(batch, heads, mean_len, DTYPES[name], device=device,
                                                               q_dtype=q_dtype, pool_gib=pool_gib,
                                                               contiguous=contiguous)
        scale = q.shape[-1] ** -0.5
        used = lens[0, :batch].long()
        pool_bytes = int(used.sum()) * q.shape[-1] * 2 * k_pool.element_size()
        check = seq_ids.clone()
        check[8:] = -1  # the twin on the first 8 rows (the rest skipped): it gathers every slot
        ref = reference.paged_decode_attention_ref(q, k_pool, v_pool, table, lens, check, 0, scale, 16)
        for mode, block, stage, warp, split, read in itertools.product(modes, blocks, stages, warps, splits,
                                                                       reads if name == "fp8" else (None,)):
            read = read or (triton_kernels.fp8_read_dtype(q.dtype) if name == "fp8" else None)
            config = {"dtype": name, "block_tokens": block, "num_stages": stage, "num_warps": warp,
                      "num_splits": split or triton_kernels.default_splits(table.shape[-1], batch * heads),
                      "read": str(read).replace("torch.", "") if read else "-", "mode": mode}

            def run(ids=seq_ids):
                return triton_kernels.paged_decode_attention(q, k_pool, v_pool, table, lens, ids, 0, scale, 16,
                                                             block_tokens=block, num_stages=stage, num_warps=warp,
                                                             num_splits=config["num_splits"], read_dtype=read,
                                                             **MODES[mode])
            try:
                err = float((run(check)[:8].float() - ref[:8].float()).abs().max())
                ms = timer(run)
            except Exception as error:  # a tile that does not fit the SM's shared memory: record it, go on
                rows.append({**config, "batch": batch, "error": str(error)[:200]})
                continue
            rows.append({**config, "batch": batch, "rows": batch * heads, "mean_len": float(used.float().mean()),
                         "ms": ms, "tb_s": pool_bytes / ms / 1e9, "max_abs_err_vs_twin": err})
            print(json.dumps(rows[-1]), flush=True)
        del q, k_pool, v_pool, table
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# Paged decode attention: bf16 vs fp8 pages by tile ({meta['gpu']})", "",
             f"Written by `{meta['command']}`: one layer, rows × {meta['heads']} KV heads (MHA, head dim 128) at "
             "each shape (batch : mean slots per head, ragged, scattered pages). TB/s = pool bytes read / time. The "
             "engine's default tile is `block_tokens` 128, `num_stages` None (Triton's default), `num_warps` 4, "
             "splits `default_splits`.", "",
             "| batch | mean slots | dtype | fp8 read as | inner products | block_tokens | num_stages | num_warps | splits | "
             "ms | TB/s | max err vs twin |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['batch']} | {r.get('mean_len', 0):.0f} | {r['dtype']} | {r.get('read', '-')} | "
                f"{r.get('mode', 'dot')} | {r['block_tokens']} | "
                f"{r['num_stages']} | "
                f"{r['num_warps']} | {r['num_splits']} |")
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | |")
        else:
            lines.append(f"{head} {r['ms']:.3f} | {r['tb_s']:.2f} | {r['max_abs_err_vs_twin']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/engine_h200")
    parser.add_argument("--shapes", nargs="+", default=["51:3584:bf16", "201:896:bf16", "390:448:bf16", "397:896:fp8"],
                        help="BATCH:MEAN_SLOTS:DTYPE (4K context: CR 1, 4, 8 at their batches; CR 4 fp8 at its batch)")
    parser.add_argument("--heads", type=int, default=32, help="KV heads")
    parser.add_argument("--blocks", nargs="+", type=int, default=[64, 128, 256], help="block_tokens tried")
    parser.add_argument("--stages", nargs="+", default=["default", "2", "4"], help="num_stages tried")
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8], help="num_warps tried")
    parser.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4],
                        help="then, at the default tile, these split counts")
    parser.add_argument("--fp8-reads", nargs="+", default=["default"], choices=["default", "float16", "bfloat16"],
                        help="dtypes fp8 pages are read in (default: the engine's fp8_read_dtype)")
    parser.add_argument("--modes", nargs="+", default=["dot"], choices=list(MODES),
                        help="inner products tried: dot (tensor cores), sum / defer (CUDA cores; MHA)")
    parser.add_argument("--pool-gib", type=float, default=0.0,
                        help="k + v pools of at least this many GiB, the used pages scattered over them (the engine's "
                             "pools fill the GPU); default: only the pages used")
    parser.add_argument("--contiguous", action="store_true", help="each head's pages in one run (default: scattered)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention_sweep.py needs a CUDA GPU")
    stages = [None if s == "default" else int(s) for s in args.stages]
    reads = [None if r == "default" else getattr(torch, r) for r in args.fp8_reads]
    rows = []
    for shape in args.shapes:
        batch, mean_len, dtype = shape.split(":")
        common = dict(dtypes=(dtype,), reads=reads, modes=args.modes, pool_gib=args.pool_gib,
                      contiguous=args.contiguous)
        rows += sweep(int(batch), args.heads, int(mean_len), args.blocks, stages, warps=args.warps, **common)
        rows += sweep(int(batch), args.heads, int(mean_len), [128], [None], splits=args.splits, **common)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": args.shapes,
            "heads": args.heads, "pool_gib": args.pool_gib, "contiguous": args.contiguous,
            "command": "python " + " ".join(sys.argv)}
    write_report(args.out, "attention_sweep", meta, rows, report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
