"""DMC training-mode attention on the GPU: FlexAttention score_mod vs the dense-bias reference.

One decoder layer of a Llama-2-7B-shaped model (hidden 4096, 32 heads, head dim 128), bf16,
forward + backward with the DMC training path (Gumbel decisions, windowed pooling, the
log(1 - α̃) bias), against the same stock layer with SDPA (flash) as the vanilla reference.
Writes ``docs/train_attention.md`` and ``docs/results/train_attention.json``.

    python benchmarks/train_attention.py [--out docs] [--lengths 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import transformers

import dmc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_results  # noqa: E402


def build(kind: str, length: int):
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=max(length, 4096), attn_implementation="sdpa")
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    if kind == "vanilla-sdpa":
        return stock.cuda().train()
    model = dmc.convert(stock, dmc.DMCConfig(attn_implementation=kind.split("-")[1], target_cr=4.0))
    return model.cuda().train()


def measure(kind: str, length: int, batch: int, repeats: int = 5) -> dict:
    torch.cuda.empty_cache()
    try:
        model = build(kind, length)
        ids = torch.randint(0, 32000, (batch, length), device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        extra = {} if kind == "vanilla-sdpa" else {"dmc_generator": gen}

        def step():
            out = model(ids, labels=ids, **extra)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / repeats * 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30
        result = {"kind": kind, "length": length, "batch": batch, "ms_per_step": round(ms, 2),
                  "peak_gib": round(peak, 2)}
    except torch.OutOfMemoryError:
        result = {"kind": kind, "length": length, "batch": batch, "ms_per_step": None, "peak_gib": "OOM"}
    finally:
        model = None
        torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    rows = [measure(kind, length, args.batch) for length in args.lengths
            for kind in ("vanilla-sdpa", "dmc-flex", "dmc-dense")]
    out = pathlib.Path(args.out)
    meta = write_results(out, "train_attention", rows,
                         model="1 decoder layer + embeddings/head of a Llama-2-7B shape, bf16, fwd+bwd")
    lines = [
        "# DMC training-mode attention: FlexAttention vs dense bias",
        "",
        f"Written by `python benchmarks/train_attention.py` on **{gpu}** (torch {torch.__version__}, "
        f"transformers {transformers.__version__}). {meta['model']}; batch {args.batch}; mean of 5 steps after "
        "2 warm-ups; peak = `torch.cuda.max_memory_allocated`.",
        "",
        "| length | vanilla SDPA ms | DMC flex ms | DMC dense ms | vanilla GiB | DMC flex GiB | DMC dense GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in args.lengths:
        by = {r["kind"]: r for r in rows if r["length"] == length}
        cell = lambda k, f: "OOM" if by[k]["peak_gib"] == "OOM" else by[k][f]
        lines.append(f"| {length} | {cell('vanilla-sdpa', 'ms_per_step')} | {cell('dmc-flex', 'ms_per_step')} | "
                     f"{cell('dmc-dense', 'ms_per_step')} | {cell('vanilla-sdpa', 'peak_gib')} | "
                     f"{cell('dmc-flex', 'peak_gib')} | {cell('dmc-dense', 'peak_gib')} |")
    (out / "train_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
