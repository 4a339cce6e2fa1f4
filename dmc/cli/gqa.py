"""``dmc gqa``: mean-pool a model's K/V heads into groups, the starting point of GQA up-training."""

from __future__ import annotations

import argparse
import pathlib
import sys

NAME = "gqa"
HELP = ("mean-pool the K/V heads of a local HF model into groups (GQA up-training baseline, spec §8); "
        "train the result further on the DMC run's data and budget")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3)")
    parser.add_argument("--ratio", type=int, required=True, help="KV heads per group: CR 2 → 2, CR 4 → 4")
    parser.add_argument("--out", required=True, help="new or empty output directory")


def run(args: argparse.Namespace) -> int:
    import transformers

    from ..baselines import mean_pool_kv_heads
    from ..hf.convert import UnsupportedModelError

    out = pathlib.Path(args.out)
    try:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; choose a new --out")
        if not (pathlib.Path(args.model) / "config.json").is_file():
            raise ValueError(f"{args.model} is not a Hugging Face model directory (no config.json)")
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
        pooled = mean_pool_kv_heads(model, args.ratio)
    except (ValueError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pooled.save_pretrained(out)
    try:
        transformers.AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    except Exception:  # noqa: BLE001 - a model without a tokenizer is still a valid output
        print("note: no tokenizer found beside the model; only the weights were written", file=sys.stderr)
    print(f"wrote {type(pooled).__name__} with {pooled.config.num_key_value_heads} KV heads to {out}")
    return 0
