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
    from ..errors import one_line
    from ..hf.convert import UnsupportedModelError
    from ._checks import check_weights

    out = pathlib.Path(args.out).expanduser()
    model_dir = pathlib.Path(args.model).expanduser()
    try:
        if args.ratio < 1:
            raise ValueError(f"--ratio must be >= 1 (KV heads per group), got {args.ratio}")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; pass a new or empty directory")
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty; choose a new --out")
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{args.model} is not a Hugging Face model directory (no config.json)")
        try:
            transformers.AutoConfig.from_pretrained(model_dir)
        except Exception as e:  # noqa: BLE001 - broken JSON, unknown model type, ...
            raise ValueError(f"cannot read {model_dir / 'config.json'} ({one_line(e)}); copy the model directory "
                             "again or fix the file") from None
        check_weights(args.model)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - truncated or corrupt weights
            raise ValueError(f"cannot load the weights in {model_dir} ({one_line(e)}); a weight file may be "
                             "truncated or corrupt: copy the model directory again") from None
        pooled = mean_pool_kv_heads(model, args.ratio)
    except (ValueError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        pooled.save_pretrained(out)
    except OSError as e:
        print(f"error: cannot write the model into {out} ({e.strerror or one_line(e)}); choose a writable --out",
              file=sys.stderr)
        return 1
    try:
        transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    except Exception:  # noqa: BLE001 - a model without a tokenizer is still a valid output
        print("note: no tokenizer found beside the model; only the weights were written", file=sys.stderr)
    print(f"wrote {type(pooled).__name__} with {pooled.config.num_key_value_heads} KV heads to {out}")
    return 0
