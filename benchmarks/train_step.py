"""DMC training step vs the vanilla step of the same model, and MFU (target: DMC at most 1.3x vanilla).

A Llama-2-shaped ~1.3B model (hidden 2048, 22 layers, 16 heads of 128, MLP 5632, vocab 32000),
fp32 master weights with bf16 autocast, AdamW, sequence length 4096. Variants:
- vanilla: the stock transformers model with SDPA (flash) attention;
- dmc-flex: the DMC training path (Gumbel decisions, window pooling, FlexAttention score_mod),
  pooling compiled with torch.compile (the default on CUDA);
- dmc-flex-eager-pool: the same with the pooling run eagerly (compile_pooling=False);
- "+compiled": every decoder layer wrapped in torch.compile (what `dmc retrofit --compile` does),
  which removes most of the per-op launch overhead of both models.
Writes its section of ``docs/benchmarks.md`` and ``docs/results/train_step.json``.

    python benchmarks/train_step.py [--out docs] [--seq-len 4096] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dmc  # noqa: E402
from _report import write_results, write_section  # noqa: E402

H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 SXM


def model_config(seq_len: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=seq_len,
                                    attn_implementation="sdpa")


def build(variant: str, seq_len: int):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(model_config(seq_len))
    kind = variant.removesuffix("+compiled")
    if kind != "vanilla":
        settings = dmc.DMCConfig(attn_implementation="flex", target_cr=4.0, compile_pooling=kind == "dmc-flex")
        model = dmc.convert(model, settings)
        dmc.zero_decision_channels(model)
    if variant.endswith("+compiled"):
        dmc.hf.compile_decoder_layers(model)
    return model.cuda().train()


def flops_per_step(model, tokens: int, seq_len: int) -> float:
    """6·N·T for the matmuls (embedding lookup excluded) + causal attention 6·layers·d·seq·T."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 6 * n * tokens + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq_len * tokens


def measure(variant: str, seq_len: int, batch: int, steps: int) -> dict:
    model = build(variant, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, 32000, (batch, seq_len), device="cuda")
    dmc_model = not variant.startswith("vanilla")
    extra = {"dmc_target_cr": 2.0} if dmc_model else {}

    def step(i: int) -> None:
        if dmc_model:
            extra["dmc_generator"] = torch.Generator(device="cuda").manual_seed(i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, use_cache=False, **extra)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(3):  # warm-up, compilation included
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(100 + i)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * seq_len
    row = {"variant": variant, "seq_len": seq_len, "batch": batch, "ms_per_step": round(seconds * 1e3, 1),
           "tokens_per_s": round(tokens / seconds), "mfu": round(flops_per_step(model, tokens, seq_len) / seconds
                                                                / H100_BF16_PEAK, 4),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=["vanilla", "dmc-flex", "dmc-flex-eager-pool",
                                                          "vanilla+compiled", "dmc-flex+compiled"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    rows = [measure(v, args.seq_len, args.batch, args.steps) for v in args.variants]
    base = next(r for r in rows if r["variant"] == "vanilla")
    out = pathlib.Path(args.out)
    write_results(out, "train_step", rows, command="python benchmarks/train_step.py " + " ".join(sys.argv[1:]))
    lines = [
        "## Training step: DMC vs vanilla (`benchmarks/train_step.py`)",
        "",
        f"**{gpu}**, torch {torch.__version__}, transformers {transformers.__version__}. Llama-2-shaped "
        f"{base['params_b']}B model, fp32 master weights + bf16 autocast, AdamW, batch {args.batch} × "
        f"{args.seq_len} tokens, mean of {args.steps} steps after 3 warm-ups. MFU counts 6·N·T + causal attention "
        "against 989 TFLOP/s.",
        "",
        "| variant | ms/step | tokens/s | MFU | peak GiB | vs vanilla (same compilation) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next((x for x in rows if x["variant"] == ("vanilla+compiled" if r["variant"].endswith("+compiled")
                                                         else "vanilla")), base)
        lines.append(f"| {r['variant']} | {r['ms_per_step']} | {r['tokens_per_s']} | {r['mfu']:.1%} | "
                     f"{r['peak_gib']} | {r['ms_per_step'] / ref['ms_per_step']:.2f}x |")
    lines += ["", "Target: DMC step ≤ 1.3x vanilla at 4096 tokens."]
    write_section(out / "benchmarks.md", "train_step", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
