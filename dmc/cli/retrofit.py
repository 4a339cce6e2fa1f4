"""``dmc retrofit``: zero-out → retrofit → fine-tune a local HF model into a DMC model
(``--method plain``: the same run without DMC, e.g. GQA up-training of a ``dmc gqa`` model)."""

from __future__ import annotations

import argparse
import os
import dataclasses
import sys
import types
import typing

NAME = "retrofit"
HELP = ("retrofit DMC onto a local Hugging Face model (spec §5); every setting can also come from "
        "--config FILE.yaml|json (flags win)")

_POSITIONAL = ("model",)
_HELP = {
    "model": "local Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3; or a DMC model)",
    "data": "training data: files, directories or globs of text, .jsonl or .parquet",
    "out": "output directory: the DMC model at the end, run/ (checkpoints, metrics, tensorboard) during",
    "target_cr": "target compression ratio CR* (>= 1)",
    "stages": "stages to run, in order: zero-out retrofit finetune",
    "method": "dmc (default) or plain: LM loss only on a stock model, same plan, data and budget "
              "(GQA up-training of a `dmc gqa` model)",
    "steps_per_cr": "retrofit steps per +1x of CR (the paper: 6000)",
    "retrofit_steps": "retrofit stage length (overrides steps_per_cr × (CR* - 1))",
    "lr": "peak learning rate: the base model's final pretraining lr (Llama 2: 3e-5)",
    "window": "DMC window W: most tokens one slot averages (12)",
    "max_steps": "stop after this many global steps (continue later with --resume)",
}


def _arg_type(field: dataclasses.Field):
    """(kind, item types, optional) of a TrainConfig field's annotation."""
    hint = typing.get_type_hints(_config_class())[field.name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    base = next(a for a in options if a is not type(None))
    return typing.get_origin(base) or base, typing.get_args(base), type(None) in options


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _config_class():
    from ..train.config import TrainConfig
    return TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help=_HELP["model"])
    parser.add_argument("--config", help="YAML or JSON file of settings (field names as below, with _)")
    for field in dataclasses.fields(_config_class()):
        if field.name in _POSITIONAL:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind, inner, optional = _arg_type(field)
        help_text = _HELP.get(field.name, "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", type=inner[0] if inner else str, default=argparse.SUPPRESS, help=help_text)
        else:
            parse = _optional(kind) if optional and kind in (int, float) else kind
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_text + (" ('none' to unset)" if optional else ""))


def run(args: argparse.Namespace) -> int:
    from ..train import ConfigError, Retrofitter, TrainConfig

    # only what was given on the command line: it overrides the config file
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if values.get("model") is None:
        values.pop("model", None)
    try:
        cfg = TrainConfig.from_file(args.config, **values) if args.config else TrainConfig(**values)
        out = Retrofitter(cfg).run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is not None and os.environ.get("RANK", "0") == "0":
        if cfg.method == "plain":
            print(f"model written to {out} (a stock model: transformers.AutoModelForCausalLM.from_pretrained)")
        else:
            print(f"DMC model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained "
                  "after `import dmc`)")
    return 0
