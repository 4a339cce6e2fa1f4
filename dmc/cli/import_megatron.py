"""``dmc import-megatron``: NVIDIA's Megatron-LM DMC checkpoints → Hugging Face DMC models."""

from __future__ import annotations

import argparse
import sys
import warnings

NAME = "import-megatron"
HELP = ("convert a Megatron-LM (Megatron-Core) Llama checkpoint, e.g. nvidia/Llama-2-7B-DMC-4x, into a "
        "Hugging Face DMC model directory (see docs/megatron.md)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model_optim_rng.pt, its mp_rank_00/ directory, an iter_XXXXXXX/ or "
                                           "release/ directory, or a checkpoint root with "
                                           "latest_checkpointed_iteration.txt")
    parser.add_argument("--out", required=True, help="output directory (written atomically; must be empty or new)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="local Hugging Face tokenizer directory to save with the model (its length trims "
                             "Megatron's vocabulary padding)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--plain", action="store_true",
                      help="accept a checkpoint without DMC settings and write a plain LlamaForCausalLM (a DMC "
                           "checkpoint is always written as a DMC model)")
    kind.add_argument("--assume-dmc", action="store_true",
                      help="treat a checkpoint whose args lack the dmc_* settings as DMC (window 12, c = 5)")
    parser.add_argument("--vocab-size", type=int, help="keep this many embedding rows (default: the tokenizer's "
                                                       "length, or all rows without a tokenizer)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="dtype of the written weights (default: the checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle the checkpoint without torch.load's weights_only restrictions (only for "
                             "files you trust)")


def run(args: argparse.Namespace) -> int:
    from ..interop.megatron import MegatronImportError, import_megatron

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            model = import_megatron(
                args.checkpoint, args.out, tokenizer=args.tokenizer, allow_non_dmc=args.plain,
                assume_dmc=args.assume_dmc, vocab_size=args.vocab_size,
                dtype=None if args.dtype == "auto" else args.dtype, force=args.force,
                trust_pickle=args.trust_pickle,
            )
        except MegatronImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for w in caught:
        if w.filename == __file__:  # the importer's own warnings (stacklevel=2 points here)
            print(f"note: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    config = model.config
    kind = "DMC Llama" if getattr(config, "dmc", None) else "Llama (no DMC)"
    dmc = ""
    if getattr(config, "dmc", None):
        d = config.dmc
        dmc = f", window {d['window']}, c = {d['init_offset']}, target CR {d['target_cr']}"
    print(f"wrote {kind} to {args.out}: {config.num_hidden_layers} layers, {config.num_attention_heads} heads / "
          f"{config.num_key_value_heads} KV heads of dim {config.head_dim}, vocab {config.vocab_size}, "
          f"{model.dtype}{dmc}")
    return 0
