"""What the FP8 KV cache (``kv_cache_dtype="fp8"``) costs in held-out perplexity, through the engine.

For each model directory (a DMC model and, for comparison, the original vanilla one) and each
cache (auto = the model dtype; fp8 = e4m3 pages with scales 1.0; fp8-calibrated = e4m3 pages with per-(layer,
KV head) scales from ``LLM.calibrate_kv_scales`` on ``--calibration-windows`` other held-out windows, never the
scored ones), every held-out window is
prefilled through the engine's own cache in chunks of ``--chunk`` tokens, and the logits of every token are
scored. Small chunks matter: inside one chunk attention uses the chunk's exact keys, so the quantisation only
shows where a token attends to cached slots; with 16-token chunks nearly all of a window's context is read
from the pages, as in decoding. The path is the engine's chunked prefill (``ModelRunner.prefill_logits``: the
model's DMC attention over the cache's ``SequenceView``, which quantises the slots it writes and dequantises
the ones it reads).

Writes ``OUT_DIR/kv_fp8_quality.json`` (rows: model, kv_cache_dtype, perplexity, realized_cr, windows,
tokens; meta) and ``OUT_DIR/kv_fp8_quality.md`` (the relative cost, fp8 / auto - 1).

    python benchmarks/kv_fp8_quality.py MODEL_DIR [MODEL_DIR ...] --heldout DIR... --out OUT_DIR
        [--windows 16 --window-len 1024 --chunk 16 --calibration-windows 8 --device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import sys
from dataclasses import asdict, dataclass

import torch
import transformers

import dmc
from dmc.engine.llm import KV_CACHE_DTYPES as ENGINE_KV_DTYPES
from dmc.eval.perplexity import token_windows
from dmc.train.data import read_texts

# The model dtype, every dtype the engine offers, and fp8 with calibrated scales.
KV_CACHE_DTYPES = ("auto", *ENGINE_KV_DTYPES, "fp8-calibrated")


@dataclass
class QualityRow:
    model: str
    kv_cache_dtype: str  # one of KV_CACHE_DTYPES
    perplexity: float
    realized_cr: float  # tokens / slots over every (layer, KV head) after each window, raw window included
    windows: int
    tokens: int  # predicted tokens


def score(llm: dmc.LLM, windows: list[list[int]], chunk: int) -> tuple[float, float, int]:
    """Mean next-token NLL over ``windows`` prefilled through ``llm``'s cache ``chunk`` tokens at a time, the
    realized CR of the cache after each window (pooled), and the predicted tokens."""
    cache, nll, predicted, tokens, slots = llm.cache, 0.0, 0, 0, 0
    for ids in windows:
        row = cache.open_row()
        try:
            for start in range(0, len(ids), chunk):
                logits = llm.runner.prefill_logits(row, ids[start:start + chunk], start)
                targets = torch.tensor(ids[start + 1:start + chunk + 1], device=logits.device)
                nll += float(torch.nn.functional.cross_entropy(logits[:len(targets)], targets, reduction="sum"))
                predicted += len(targets)
            tokens += len(ids) * cache.layout.rows
            slots += int(cache.slot_counts(row, len(ids)).sum())
        finally:
            cache.close_row(row)
    return nll / predicted, tokens / slots, predicted


def evaluate(model_dir: str, windows: list[list[int]], kv_cache_dtype: str, chunk: int, device: str,
             dtype: str, calibration: list[list[int]]) -> QualityRow:
    calibrated = kv_cache_dtype == "fp8-calibrated"
    llm = dmc.LLM(model_dir, dtype=dtype, device=device, max_model_len=max(len(w) for w in windows) + 1,
                  max_num_seqs=1, prefill_chunk=chunk, cuda_graphs=False, progress=False,
                  kv_cache_dtype="fp8" if calibrated else kv_cache_dtype)
    if calibrated:
        llm.calibrate_kv_scales([w[:-1] for w in calibration])  # prompt + one generated token fit the context
    loss, cr, predicted = score(llm, windows, chunk)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return QualityRow(model=model_dir, kv_cache_dtype=kv_cache_dtype, perplexity=math.exp(min(loss, 50.0)),
                      realized_cr=cr, windows=len(windows), tokens=predicted)


def heldout_windows(model_dir: str, texts: list[str], count: int, length: int,
                    calibration: int) -> tuple[list[list[int]], list[list[int]]]:
    """``count`` windows of ``length`` tokens of the held-out texts, in the model's own tokenizer, and the
    ``calibration`` windows that follow them (disjoint: the calibrated scales never see a scored token)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    windows = [w.tolist() for w in token_windows(tokenizer, texts, length, count + calibration)]
    if len(windows) <= count:
        raise ValueError(f"the held-out texts hold {len(windows)} windows of {length} tokens in {model_dir}'s "
                         f"tokenizer, fewer than --windows {count} + at least one calibration window: add "
                         "held-out text or lower --windows / --window-len")
    return windows[:count], windows[count:]


def report(rows: list[QualityRow], meta: dict) -> str:
    lines = [f"## FP8 KV cache: held-out perplexity through the engine ({meta['gpu']})", "",
             f"`benchmarks/kv_fp8_quality.py`: {rows[0].windows} windows of {meta['window_len']} tokens, each "
             f"prefilled through the engine's cache in chunks of {meta['chunk']} (so nearly every token attends "
             "to cached slots); model dtype " f"{meta['dtype']}; fp8 = e4m3 pages with scales 1.0, fp8-calibrated = "
             f"with a scale per (layer, KV head) from `LLM.calibrate_kv_scales` on {meta.get('calibration_windows', '-')} "
             "other held-out windows.", "",
             "| model | realized CR | perplexity (auto) | perplexity (fp8) | relative cost (fp8/auto − 1) "
             "| perplexity (fp8-calibrated) | relative cost (calibrated) |",
             "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.kv_cache_dtype: r for r in rows if r.model == model}
        auto, fp8, calibrated = by.get("auto"), by.get("fp8"), by.get("fp8-calibrated")
        cost = lambda r: f"{r.perplexity / auto.perplexity - 1:+.2%}" if auto and r else "-"  # noqa: E731
        ppl = lambda r: f"{r.perplexity:.4f}" if r else "-"  # noqa: E731
        lines.append(f"| {pathlib.Path(model).name} | {(auto or fp8 or calibrated).realized_cr:.2f} | {ppl(auto)} "
                     f"| {ppl(fp8)} | {cost(fp8)} | {ppl(calibrated)} | {cost(calibrated)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories (a DMC model, the vanilla original)")
    parser.add_argument("--heldout", nargs="+", required=True, help="held-out files or directories")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=16, help="prefill chunk (tokens)")
    parser.add_argument("--calibration-windows", type=int, default=8,
                        help="held-out windows after the scored ones that calibrate the fp8-calibrated scales")
    parser.add_argument("--device", default="cuda", help="cuda (the engine's Triton kernels) or cpu (their twins)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (bf16 on CUDA, fp32 on CPU), ...")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; pass --device cpu to run the engine's PyTorch twins", file=sys.stderr)
        return 2
    if args.windows < 1 or args.window_len < 2 or args.chunk < 1 or args.calibration_windows < 1:
        print("error: --windows, --chunk and --calibration-windows must be >= 1 and --window-len >= 2",
              file=sys.stderr)
        return 2
    texts = read_texts(args.heldout)
    rows = []
    for model in args.models:
        windows, calibration = heldout_windows(model, texts, args.windows, args.window_len, args.calibration_windows)
        for kv in KV_CACHE_DTYPES:
            rows.append(evaluate(model, windows, kv, args.chunk, args.device, args.dtype, calibration))
            print(json.dumps(asdict(rows[-1])), flush=True)
    meta = {"gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "command": " ".join(["python", "benchmarks/kv_fp8_quality.py", *(argv or sys.argv[1:])]),
            "torch": torch.__version__, "dtype": args.dtype, "window_len": args.window_len, "chunk": args.chunk,
            "heldout": args.heldout,
            "calibration_windows": args.calibration_windows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_fp8_quality.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    (out / "kv_fp8_quality.md").write_text(report(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
