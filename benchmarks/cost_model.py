"""The decode cost model of the engine design (check: the CR 1 step within 10% of the cost model)
against the recorded engine rows: T_step ≈ KV bytes read per step / copy bandwidth + weight GEMMs.

- copy bandwidth: measured here, on this GPU (a device-to-device copy of ``--copy-gib``, read + written
  bytes per second, CUDA events), or, with ``--bandwidth-from``, the one an earlier run measured on the rows'
  GPU (its cost_model.json: re-renders the model for new rows without a GPU);
- KV bytes per step: each row's batch × its mean slots per head over the measured decode steps (the
  positions ``prompt_len + gen_len - measured_steps`` .. ``prompt_len + gen_len - 1``, over the row's realized
  CR) × the bytes of one slot of every (layer, KV head): k and v, in the pool's dtype;
- weight GEMMs: the decode profile's "weight GEMMs" group at the same (CR, batch, KV dtype)
  (``benchmarks/profile_decode.py``'s JSON); rows with no such profile get none.

Writes ``OUT/cost_model.json`` and ``OUT/cost_model.md``::

    python benchmarks/cost_model.py --rows docs/results/throughput.json \\
        --profile docs/results/engine_h200/profile_decode_final.json --out docs/results/engine_h200
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _report import write_report  # noqa: E402
from throughput import SHAPE, cuda_time  # noqa: E402  (the benchmark model's shape)

POOL_BYTES = {"auto": 2, "fp8": 1}  # bytes an element: bf16 (the benchmark's model dtype) or e4m3


def copy_bandwidth(gib: float) -> float:
    """Bytes per second of a device-to-device copy (read + write), the best of three timings of 10 copies."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = min(cuda_time(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * src.numel() * src.element_size() / seconds


def slot_bytes(kv_cache_dtype: str) -> int:
    """Bytes of one slot in every (layer, KV head) of the benchmark model: k and v."""
    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    return SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * 2 * head_dim * POOL_BYTES[kv_cache_dtype]


def model_rows(rows: list[dict], profile: list[dict], bandwidth: float) -> list[dict]:
    gemms = {(p["cr"], p["batch"], p["kv_cache_dtype"]): p["eager"]["groups_ms"].get("weight GEMMs")
             for p in profile}
    out = []
    for row in rows:
        if row["part"] != "engine":
            continue
        dtype = row.get("kv_cache_dtype", "auto")
        end = row["prompt_len"] + row["gen_len"]
        mean_slots = (end - (row["measured_steps"] + 1) / 2) / row["realized_cr"]
        kv_bytes = row["batch"] * mean_slots * slot_bytes(dtype)
        kv_ms = kv_bytes / bandwidth * 1e3
        gemm_ms = gemms.get((row["cr"], row["batch"], dtype))
        model_ms = None if gemm_ms is None else kv_ms + gemm_ms
        out.append({"config": row["config"], "cr": row["cr"], "kv_cache_dtype": dtype, "batch": row["batch"],
                    "step_ms": row["step_ms"], "kv_gb": kv_bytes / 1e9, "kv_ms": kv_ms, "gemm_ms": gemm_ms,
                    "model_ms": model_ms, "step_vs_model": None if model_ms is None else row["step_ms"] / model_ms})
    return out


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"## Decode cost model vs the engine rows ({meta['gpu']})", "",
             f"Written by `{meta['command']}`. Model: KV bytes per step / copy bandwidth "
             f"({meta['copy_tb_s']:.2f} TB/s, measured on the GPU"
             f"{' by the run of ' + meta['bandwidth_from'] if meta.get('bandwidth_from') else ''}: device-to-device "
             "copy, read + write) + the decode "
             "profile's weight GEMMs at the same batch. Step: the row's measured decode step (CUDA graphs).", "",
             "| config | batch | KV GB / step | KV ms | GEMM ms | model ms | step ms | step / model |",
             "|---|---|---|---|---|---|---|---|"]
    num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['config']} | {r['batch']} | {r['kv_gb']:.1f} | {r['kv_ms']:.2f} | {num(r['gemm_ms'], '.2f')} "
                     f"| {num(r['model_ms'], '.2f')} | {r['step_ms']:.2f} | {num(r['step_vs_model'], '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, help="benchmarks/throughput.py's results JSON")
    parser.add_argument("--profile", required=True, help="benchmarks/profile_decode.py's JSON")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the timed copy")
    parser.add_argument("--bandwidth-from", default=None, metavar="COST_MODEL_JSON",
                        help="take the copy bandwidth an earlier run measured on the rows' GPU (no GPU needed)")
    args = parser.parse_args(argv)
    if args.bandwidth_from is None and not torch.cuda.is_available():
        print("error: the copy bandwidth is measured on the GPU the rows were recorded on: no CUDA device here "
              "(or pass --bandwidth-from an earlier cost_model.json of that GPU)", file=sys.stderr)
        return 2
    paths = [args.rows, args.profile] + ([args.bandwidth_from] if args.bandwidth_from else [])
    missing = [path for path in paths if not pathlib.Path(path).is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    results = json.loads(pathlib.Path(args.rows).read_text())
    profile = json.loads(pathlib.Path(args.profile).read_text())
    if args.bandwidth_from is not None:
        earlier = json.loads(pathlib.Path(args.bandwidth_from).read_text())["meta"]
        gpu, bandwidth = earlier["gpu"], earlier["copy_tb_s"] * 1e12
    else:
        gpu, bandwidth = torch.cuda.get_device_name(), None
    if results["meta"]["gpu"] != gpu:
        print(f"error: the rows were recorded on {results['meta']['gpu']}, the bandwidth is {gpu}'s", file=sys.stderr)
        return 2
    if bandwidth is None:
        bandwidth = copy_bandwidth(args.copy_gib)
    rows = model_rows(results["rows"], profile["rows"], bandwidth)
    meta = {"gpu": gpu, "torch": torch.__version__, "copy_tb_s": bandwidth / 1e12,
            "bandwidth_from": args.bandwidth_from,
            "command": " ".join(["python", "benchmarks/cost_model.py", *(argv if argv is not None else sys.argv[1:])])}
    write_report(args.out, "cost_model", meta, rows, report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
