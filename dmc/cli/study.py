"""``dmc study``: DMC at several CRs against plain continued training on the same tokens, GQA
up-training, H2O, TOVA and SnapKV, on a user's model and data; JSON + markdown + plots, resumable."""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

NAME = "study"
HELP = ("compare DMC at each --crs with plain continued training on the same tokens, GQA up-training, and "
        "H2O/TOVA/SnapKV at budgets matched to DMC's realized CR, on held-out data; writes OUT/results.json, "
        "results.md and plots (resumable: run it again to continue; several processes may share OUT with --only)")

EVAL_DEFAULTS = {"eval_seq_len": None, "eval_windows": 64, "eval_batch_size": 4, "eval_dtype": "float32",
                 "evict_base": "original", "device": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..study import METHODS
    parser.add_argument("model", nargs="?", help="local HF model directory, the original (Llama, Mistral, Qwen2, "
                        "Qwen3); may be left out to continue the study in --out")
    parser.add_argument("--data", nargs="+", help="training data: files, directories, globs (text, .jsonl, .parquet)")
    parser.add_argument("--heldout", nargs="+", help="held-out data, kept out of --data (refused if they overlap)")
    parser.add_argument("--out", required=True, help="the study directory: runs/<method>-<cr>x/ and the reports")
    parser.add_argument("--crs", nargs="+", type=float, help="target compression ratios, e.g. 2 4 8")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: all ({' '.join(METHODS)})")
    parser.add_argument("--recipe", help="YAML/JSON file of training settings (dmc.train.TrainConfig fields)")
    parser.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", dest="assignments",
                        help="a training setting (any TrainConfig field, e.g. lr=3e-4 retrofit_steps=600); wins "
                        "over --recipe")
    parser.add_argument("--only", nargs="+", action="extend", metavar="METHOD[@CR]",
                        help="run only these runs (e.g. dmc@4 plain h2o), e.g. one per process sharing a GPU")
    parser.add_argument("--report-only", action="store_true", help="run nothing: merge the result files of --out")
    parser.add_argument("--eval-seq-len", type=int, help="held-out window in tokens (default: the training seq_len, "
                        "at most the model's positions)")
    parser.add_argument("--eval-windows", type=int, help="at most this many held-out windows (default 64)")
    parser.add_argument("--eval-batch-size", type=int, help="windows per forward (default 4)")
    parser.add_argument("--eval-dtype", choices=("float32", "bfloat16"), help="evaluation dtype (default float32)")
    parser.add_argument("--evict-base", choices=("original", "plain"),
                        help="the model H2O/TOVA/SnapKV evict on: the untouched original (default) or plain continued "
                        "training")
    parser.add_argument("--device", help="evaluation device (default: cuda if available)")


def _command(args: argparse.Namespace) -> str:
    parts = ["dmc", "study"] + ([args.model] if args.model else [])
    for flag in ("data", "heldout", "out", "crs", "methods", "recipe", "assignments", "only", "eval_seq_len",
                 "eval_windows", "eval_batch_size", "eval_dtype", "evict_base", "device"):
        value = getattr(args, flag)
        if value is None:
            continue
        parts.append("--" + {"assignments": "set"}.get(flag, flag).replace("_", "-"))
        parts += [f"{v:g}" if isinstance(v, float) else str(v) for v in (value if isinstance(value, list) else [value])]
    if args.report_only:
        parts.append("--report-only")
    return shlex.join(parts)


def _abspath(paths: list[str]) -> list[str]:
    import os
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def settings_from(args: argparse.Namespace):
    """StudySettings from the flags, on top of the study saved in --out when MODEL is left out."""
    from ..study import StudyError, StudySettings, load_recipe, load_study, parse_assignments
    train = {**load_recipe(args.recipe), **parse_assignments(args.assignments)}
    evals = {k: getattr(args, k) for k in EVAL_DEFAULTS if getattr(args, k) is not None}
    if args.model is None:
        if not (pathlib.Path(args.out) / "study.json").exists():
            raise StudyError("no MODEL given: pass the original model directory (or --out a study directory to "
                             "continue)")
        saved = load_study(pathlib.Path(args.out))["settings"]
        given = {k: v for k, v in (("data", args.data and _abspath(args.data)), ("crs", args.crs),
                                   ("heldout", args.heldout and _abspath(args.heldout)), ("methods", args.methods)) if v}
        return StudySettings(**{**saved, **given, **evals, "train": {**saved["train"], **train}, "out": args.out})
    for flag in ("data", "heldout", "crs"):
        if not getattr(args, flag):
            raise StudyError(f"--{flag} is required (e.g. {dict(data='--data corpus/', heldout='--heldout valid/', crs='--crs 2 4 8')[flag]})")
    return StudySettings(model=str(pathlib.Path(args.model).expanduser().resolve()), data=_abspath(args.data),
                         heldout=_abspath(args.heldout), out=args.out, crs=args.crs,
                         methods=args.methods or StudySettings.__dataclass_fields__["methods"].default_factory(),
                         train=train, **{**EVAL_DEFAULTS, **evals})


def run(args: argparse.Namespace) -> int:
    from ..hf.convert import UnsupportedModelError
    from ..study import StudyError, report, run_study
    from ..train import ConfigError
    import transformers
    transformers.utils.logging.disable_progress_bar()  # one bar per model load would drown the study's lines
    try:
        if args.report_only:
            report(args.out)
            return 0
        run_study(settings_from(args), only=args.only, command=_command(args))
    except (StudyError, ConfigError, UnsupportedModelError, ValueError, FileNotFoundError) as e:  # bad input
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0
