"""``dmc retrofit``: zero-out → retrofit → fine-tune a local HF model into a DMC model
(``--method plain``: the same run without DMC, e.g. GQA up-training of a ``dmc gqa`` model)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

NAME = "retrofit"
HELP = ("retrofit DMC onto a local Hugging Face model (spec §5); every setting can also come from "
        "--config FILE.yaml|json (flags win)")

_POSITIONAL = ("model",)
# One line per TrainConfig field; the default is appended from the dataclass.
_HELP = {
    "model": "local Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3; or a DMC model)",
    "data": "training data: files, directories or globs of text, .jsonl or .parquet",
    "out": "output directory (new, empty, or a run of ours): the DMC model at the end, run/ (checkpoints, "
           "metrics, tensorboard) during; never the model's or the data's directory",
    "target_cr": "target compression ratio CR* (>= 1)",
    "stages": "stages to run, in this order (any subset): zero-out retrofit finetune hard",
    "method": "dmc (the retrofit) or plain: LM loss only on a stock model, same plan, data and budget "
              "(GQA up-training of a `dmc gqa` model)",
    "seq_len": "tokens per packed training row (capped at the model's max positions)",
    "text_field": "field of .jsonl/.parquet records that holds the text",
    "val_fraction": "share of whole documents held out for validation (0 = none)",
    "token_cache": "directory of the memory-mapped token shards ('none': ~/.cache/dmc/tokens)",
    "micro_batch_size": "rows per forward pass and process",
    "grad_accum": "micro-steps per optimizer step; global batch = micro-batch-size x grad-accum x processes rows",
    "lr": "peak learning rate: the base model's final pretraining lr (Llama 2: 3e-5)",
    "min_lr": "learning rate at the end of the fine-tune cosine",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this value",
    "warmup_steps": "linear lr warmup at the start of each stage, in steps",
    "zero_out_steps": "length of the zero-out stage in steps (channel D-1 fades out over 80%% of it)",
    "steps_per_cr": "retrofit steps per +1x of CR (the paper: 6000)",
    "retrofit_steps": "retrofit stage length in steps (overrides steps-per-cr x (CR* - 1); 'none': use that)",
    "finetune_steps": "length of the fine-tune stage at fixed CR*, in steps",
    "cr_loss_weight": "weight of the compression loss (the paper: 1); with --cr-constraint dual the weight it "
                      "starts from",
    "preset": "'paper' fills every setting not given with spec §5's recipe; 'none' keeps this project's defaults",
    "logit_scale": "s in the training decision logit a = s*k[D-1] - c (folded into the weights on save; "
                   "the paper: 1)",
    "cr_constraint": "hinge (spec §4: fixed weight) or dual (a multiplier that grows while the CR lags)",
    "cr_dual_rate": "dual constraint: log-weight step per unit of relative CR shortfall",
    "cr_dual_max": "dual constraint: the largest multiplier",
    "on_bad_file": "files that are not UTF-8 text (NUL bytes, invalid UTF-8): skip (named in a warning) or error",
    "cr_two_sided": "at fixed CR* (fine-tune, hard) also penalise compressing more than the target (the paper: no)",
    "max_head_cr": "optional CR ceiling per (layer, head) ('none': no ceiling)",
    "head_ceiling_weight": "weight of the per-head CR ceiling loss, relative to the CR loss's current weight",
    "distill_weight": "weight of the KL to a frozen teacher ('none': 1 for dmc, 0 for plain)",
    "teacher": "HF directory of the distillation teacher ('none': the input model)",
    "distill_temperature": "softmax temperature of the distillation KL",
    "distill_direction": "forward = KL(teacher||student), reverse = KL(student||teacher)",
    "lm_weight": "weight of the LM cross-entropy (0: distillation only)",
    "noise_end": "Gumbel noise scale reached at the end of the fine-tune (1 = the paper's constant noise)",
    "hard_steps": "length of the hard stage (inference forward, no noise) ('none': a quarter of finetune-steps)",
    "merge_delay": "keep the last N tokens of every head raw; a token merges once it is N old (0 = the paper; "
                   "'none': min(32, a quarter of the slots of a seq-len row at the target CR))",
    "window": "DMC window W: most tokens one slot averages ('none': unbounded)",
    "init_offset": "c, the decision logit offset at the start (merges start rare: sigma(-5) ~ 0.007)",
    "temperature": "tau of the Gumbel-sigmoid relaxation of the decisions during training (not a sampling "
                   "temperature)",
    "attn_implementation": "training attention: auto (flex on CUDA, dense on CPU), flex or dense",
    "seed": "seed of the data order, the held-out split and the Gumbel noise",
    "bf16": "bf16 autocast (default: on CUDA only)",
    "activation_checkpointing": "recompute decoder layers in backward (less memory, ~30%% slower)",
    "compile": "torch.compile every decoder layer",
    "eval_every": "validation every N steps (and at the end)",
    "eval_batches": "micro-batches per validation",
    "save_every": "checkpoint every N steps (and at each stage end)",
    "keep_checkpoints": "checkpoints kept in run/checkpoints while training; a finished run keeps the last one "
                        "only ('all' or 0: keep every one)",
    "tensorboard": "write TensorBoard scalars to run/tensorboard",
    "wandb": "log to Weights & Biases",
    "wandb_project": "W&B project name",
    "progress": "show a progress bar",
    "resume": "continue the unfinished run in --out from its last checkpoint",
    "overwrite": "discard the dmc run in --out (only our files: run/ and the model we wrote) and start again",
    "max_steps": "stop after this many global steps (continue later with --resume)",
    "nan_patience": "further steps with a non-finite loss tolerated before the run stops (the model is then not "
                    "written; the last good checkpoint stays)",
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


_REQUIRED = ("data", "out")  # TrainConfig refuses to run without them (from a flag or --config)
_UNSET = {"max_steps": "no limit"}  # what an unset (None) setting means, where its help does not say


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _default(field: dataclasses.Field) -> str:
    """What the help says of a setting's default: "required", the value the recipe gives a setting
    left unset (and the paper preset's, where it differs), or the field's own default ("" when there
    is nothing to say: an unset optional setting whose help tells what unset means)."""
    from ..train.config import PRESETS, RECIPE_DEFAULTS

    if field.name in _REQUIRED:
        return "required: no default"
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    if value is None:
        value = RECIPE_DEFAULTS.get(field.name, _UNSET.get(field.name))
    paper = PRESETS["paper"].get(field.name)
    if value is None or value == "":
        shown = "default: none" if "'none'" in _HELP.get(field.name, "") else ""
    else:
        shown = f"default: {_show(value)}"
    if paper is not None and paper != value:
        shown = f"{shown}; --preset paper: {_show(paper)}" if shown else f"--preset paper: {_show(paper)}"
    return shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help=_HELP["model"])
    parser.add_argument("--config", help="YAML or JSON file of settings (field names as below, with _); "
                                         "flags given here win")
    for field in dataclasses.fields(_config_class()):
        if field.name in _POSITIONAL:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind, inner, optional = _arg_type(field)
        help_text = _HELP.get(field.name, "")
        if "default:" not in help_text and _default(field):
            help_text = f"{help_text} ({_default(field)})".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", type=inner[0] if inner else str, default=argparse.SUPPRESS, help=help_text)
        else:
            parse = _optional(kind) if optional and kind in (int, float) else kind
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_text)


def run(args: argparse.Namespace) -> int:
    from ..train import ConfigError, Retrofitter, TrainConfig
    from ..train.trainer import TrainingDiverged

    # only what was given on the command line: it overrides the config file
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if values.get("model") is None:
        values.pop("model", None)
    try:
        cfg = TrainConfig.from_file(args.config, **values) if args.config else TrainConfig(**values)
        trainer = Retrofitter(cfg)
        if trainer.finished:
            trainer.run()  # releases the run directory; trains and writes nothing
            print(f"{trainer.out} already holds the finished model of this run ({trainer.total_steps} steps); "
                  "nothing to resume (--overwrite trains it again)")
            return 0
        out = trainer.run()
        if trainer.checkpoints_note and os.environ.get("RANK", "0") == "0":
            print(trainer.checkpoints_note)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if out is not None and os.environ.get("RANK", "0") == "0":
        if cfg.method == "plain":
            print(f"model written to {out} (a stock model: transformers.AutoModelForCausalLM.from_pretrained)")
        else:
            print(f"DMC model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained "
                  "after `import dmc`)")
    return 0
