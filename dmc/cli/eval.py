"""``dmc eval``: held-out perplexity (both modes, at one or several window lengths), realized CR
with a heatmap, recall probe, RULER-style long-context tasks (for DMC, with the eviction baselines at
its realized slots).

Nothing computed is lost: the arguments and the output paths are checked before any work starts,
each figure is printed as soon as it is computed, ``--out`` is rewritten (atomically) after each
one with ``"complete": false`` until the end, and a failing extra (the heatmap) or a failing later
stage still leaves the report with what was computed, saying what failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile

from ..config import is_dmc as dmc_model

NAME = "eval"
HELP = ("evaluate a local HF model (DMC or plain): held-out perplexity in full-sequence mode and, for DMC, "
        "through the compressed cache and in training mode (relaxed decisions); realized CR per layer/head "
        "(+ heatmap PNG); key-value recall probe; RULER-style long-context tasks, with H2O/TOVA/SnapKV at DMC's "
        "realized slots")
HELP_DEFAULTS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local Hugging Face model directory")
    parser.add_argument("--data", nargs="+", required=True, help="held-out text: files, directories, globs, .jsonl")
    parser.add_argument("--text-field", default="text", help="field of the text in .jsonl/.parquet files")
    parser.add_argument("--seq-len", type=int, nargs="+", default=None,
                        help="tokens per evaluation window, >= 2 (default: 1024), at most the model's positions "
                             "(the default drops to them); several lengths: perplexity and realized CR at each, "
                             "the other figures at the first")
    parser.add_argument("--max-windows", type=int, default=64, help="at most this many windows of seq-len tokens")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--recall-pairs", type=int, default=20, help="key-value pairs per recall prompt (0: skip)")
    parser.add_argument("--recall-trials", type=int, default=20, help="recall prompts (>= 1 unless --recall-pairs 0)")
    parser.add_argument("--ruler-lengths", type=int, nargs="+", default=[],
                        help="RULER-style tasks at these prompt lengths in tokens, e.g. 4096 8192 (default: none)")
    parser.add_argument("--ruler-tasks", nargs="+", default=None, metavar="TASK",
                        help="which RULER tasks: niah_single niah_multikey niah_multivalue variable_tracking "
                             "(default: all)")
    parser.add_argument("--ruler-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                        help="where the needles start in the haystack, 0 (start) to 1 (end)")
    parser.add_argument("--ruler-trials", type=int, default=4, help="trials per (task, length, depth)")
    parser.add_argument("--baselines", nargs="+", default=[], choices=["h2o", "tova", "snapkv"],
                        help="for a DMC model: run the RULER tasks again with these eviction baselines at DMC's "
                             "realized slots per length (ceil(length / CR))")
    parser.add_argument("--baseline-model", default=None,
                        help="the model the baselines evict on, e.g. the original of the DMC model (default: the "
                             "DMC model itself run uncompressed)")
    parser.add_argument("--out", help="write the report as JSON here (missing folders are created)")
    parser.add_argument("--heatmap", help="write the per-layer/per-head CR heatmap PNG here (DMC models; needs "
                                          "matplotlib)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")


class _StageFailed(Exception):
    """A figure could not be computed (the message says which and why); what came before is kept."""


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a value that cannot work (before anything is loaded)."""
    for flag, value, least in (*(("--seq-len", n, 2) for n in args.seq_len or [1024]),
                               ("--max-windows", args.max_windows, 1),
                               ("--batch-size", args.batch_size, 1), ("--recall-pairs", args.recall_pairs, 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.recall_pairs > 0 and args.recall_trials < 1:
        raise ValueError(f"--recall-trials must be >= 1, got {args.recall_trials} (--recall-pairs 0 skips the "
                         "recall probe)")
    if args.ruler_lengths:
        from ..eval.ruler import TASKS, check_ruler
        try:
            check_ruler(args.ruler_tasks or TASKS, args.ruler_lengths, args.ruler_depths, args.ruler_trials)
        except ValueError as e:
            raise ValueError(f"--ruler-*: {e}") from None
    elif args.baselines:
        raise ValueError("--baselines run the RULER tasks: give --ruler-lengths too")
    if args.baseline_model is not None and not args.baselines:
        raise ValueError("--baseline-model is the model --baselines evict on: give --baselines too")


def check_output(path: str, flag: str, protected: list[pathlib.Path]) -> pathlib.Path:
    """Make sure ``path`` can be written before the evaluation starts: not a directory, not one of
    the inputs, its folder exists (created if missing) and takes a new file. ValueError otherwise."""
    target = pathlib.Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path (e.g. {target / 'report.json'})")
    if target.resolve() in protected:
        raise ValueError(f"{flag} {path} would overwrite an input file; choose another path")
    folder = target.parent
    blocker = next((a for a in [folder, *folder.parents] if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{flag} {path}: {blocker} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "the file is read-only")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path} cannot be written ({exc.strerror or exc}); choose a writable path") from exc
    return target


def _model_files(model: str) -> set[pathlib.Path]:
    """The files of a model directory that loading reads (an output must not replace them)."""
    folder = pathlib.Path(model).resolve()
    patterns = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.index.json", "tokenizer*",
                "special_tokens_map.json", "*.model", "vocab*", "merges*")
    return {f for pattern in patterns for f in folder.glob(pattern) if f.is_file()}


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value):
    """The report with non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import dmc  # noqa: F401 - registers the DMC model types
    from ..train.config import ConfigError
    from ..train.data import discover_files, read_text_files, skipped_line
    from ._checks import check_weights, max_positions
    from ._engine_args import check_device, check_model_dir, describe_load_error, load_errors

    try:
        check_arguments(args)
        check_model_dir(args.model)
        if args.baseline_model is not None:
            check_model_dir(args.baseline_model)
        check_weights(args.model)
        check_device(args.device)
        files = discover_files(args.data, "held-out data (--data)")
        protected = {f.resolve() for f in files} | _model_files(args.model)
        out = None if args.out is None else check_output(args.out, "--out", protected)
        heatmap = None if args.heatmap is None else check_output(args.heatmap, "--heatmap", protected)
        if out is not None and heatmap is not None and out.resolve() == heatmap.resolve():
            raise ValueError("--out and --heatmap name the same file")
        if heatmap is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError as exc:
                raise ValueError(f"--heatmap needs matplotlib ({exc}): pip install matplotlib, or leave "
                                 "--heatmap out") from exc
        texts, skipped = read_text_files(files, args.text_field)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(f"warning: {skipped_line(skipped, len(files))}", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    except load_errors() as e:
        print(f"error: {describe_load_error(args.model, e)}", file=sys.stderr)
        return 2
    try:
        positions = max_positions(args.model)
        args.seq_lens = [_window(n, positions, tokenizer, texts) for n in args.seq_len or [None]]
        args.seq_len = args.seq_lens[0]
        longest = max(args.ruler_lengths, default=0)
        if positions is not None and longest > positions:
            raise ValueError(f"--ruler-lengths {longest} is longer than the model's {positions} positions")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    except load_errors() as e:
        print(f"error: {describe_load_error(args.model, e)}", file=sys.stderr)
        return 2
    is_dmc = dmc_model(model)
    if args.baselines and not is_dmc:
        print(f"error: --baselines evict at a DMC model's realized slots; {args.model} is a plain model",
              file=sys.stderr)
        return 2
    report: dict = {"model": str(args.model), "dmc": getattr(model.config, "dmc", None), "seq_len": args.seq_len,
                    "complete": False}
    if len(args.seq_lens) > 1:
        report["seq_lens"] = args.seq_lens
    failures: list[str] = []

    def save() -> None:
        if out is not None:
            write_atomically(out, json.dumps(_finite(report), indent=1))

    warned = []

    def save_so_far() -> None:
        """The report after each figure (a killed run keeps them); a failure here only warns once."""
        try:
            save()
        except OSError as e:
            if not warned:
                warned.append(e)
                print(f"warning: {args.out} could not be updated ({e.strerror or e}); will try again at the end",
                      file=sys.stderr)

    if heatmap is not None and not is_dmc:
        print(f"note: --heatmap {args.heatmap} not written: a plain model compresses nothing", file=sys.stderr)
        heatmap = None
    status = 0
    try:
        _evaluate(args, model, tokenizer, texts, is_dmc, heatmap, report, failures, save_so_far)
    except KeyboardInterrupt:
        report["failed"] = failures + ["interrupted"]
        _save_or_print(save, report)
        raise
    except _StageFailed as e:
        failures.append(str(e))
        print(f"error: {e}", file=sys.stderr)
        if not any(k.startswith(("perplexity", "recall", "ruler")) for k in report):
            return 2  # nothing computed (e.g. no text holds --seq-len tokens): nothing to write
        status = 1
    except BaseException:
        report["failed"] = failures + ["an unexpected error (traceback below)"]
        _save_or_print(save, report)
        raise
    report["complete"] = not failures
    if failures:
        report["failed"] = failures
    if not _save_or_print(save, report):
        status = 1
    if math.isfinite(report["perplexity_full_sequence"]):
        print(_summary(report, is_dmc))
    if failures:
        where = f"the report in {args.out} holds" if out is not None else "the lines above hold"
        print(f"{where} what was computed; failed: {'; '.join(failures)}", file=sys.stderr)
        status = 1
    return status


def _window(seq_len: int | None, positions: int | None, tokenizer, texts: list[str]) -> int:
    """The evaluation window: --seq-len, or by default 1024 (the model's positions if fewer, with a
    note). ValueError when no text holds a window, or when --seq-len is longer than the model's
    positions (its scores would come from positions it never trained on)."""
    from ..eval.perplexity import token_windows

    if seq_len is None:
        seq_len = 1024
        if positions is not None and positions < seq_len:
            print(f"note: windows of {positions} tokens, the model's positions (--seq-len to choose)",
                  file=sys.stderr)
            seq_len = positions
    if next(token_windows(tokenizer, texts, seq_len, 1), None) is None:
        raise ValueError(f"no text holds {seq_len} tokens: lower --seq-len or give longer texts")
    if positions is not None and seq_len > positions:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's {positions} positions "
                         f"(max_position_embeddings): it would score positions the model never trained on; give "
                         f"--seq-len {positions} or less")
    return seq_len


def _evaluate(args, model, tokenizer, texts, is_dmc: bool, heatmap, report: dict, failures: list[str], save) -> None:
    """Fill ``report`` figure by figure, printing and saving each as it comes."""
    from ..eval import compression_heatmap, compression_report, perplexity, recall_probe

    common = dict(seq_len=args.seq_len, max_windows=args.max_windows, batch_size=args.batch_size, progress=True)

    def measure(mode: str, label: str, key: str):
        try:
            result = perplexity(model, tokenizer, texts, mode=mode, **common)
        except ValueError as e:
            raise _StageFailed(f"perplexity ({label}): {e}") from e
        report[key] = result.perplexity
        report.setdefault("windows", result.windows)
        if not math.isfinite(result.loss):
            report[key] = float("nan")
            raise _StageFailed(f"perplexity ({label}) is not finite (mean loss {result.loss}): the model's "
                               "outputs are NaN/inf (diverged or corrupt weights?); later figures skipped")
        print(f"perplexity ({label}): {result.perplexity:.3f} (loss {result.loss:.4f} nats over "
              f"{result.tokens} tokens, {result.windows} windows)", flush=True)
        save()
        return result

    measure("full", "full sequence", "perplexity_full_sequence")
    if is_dmc:
        cached = measure("cache", "compressed cache", "perplexity_compressed_cache")
        report["compression"] = compression_report(cached.compression)
        per_layer = " ".join(f"{x:.2f}" for x in report["compression"]["per_layer_cr"])
        print(f"realized CR: {report['compression']['cr']:.2f} (per layer: {per_layer})", flush=True)
        save()
        if heatmap is not None:
            try:
                compression_heatmap(cached.compression, heatmap, title=pathlib.Path(args.model).name)
                report["heatmap"] = str(heatmap)
                print(f"heatmap: {heatmap}", flush=True)
            except Exception as e:  # an optional extra: the report goes on without it
                failures.append(f"heatmap {args.heatmap} not written ({type(e).__name__}: {e})")
                print(f"warning: {failures[-1]}", file=sys.stderr)
        measure("relaxed", "training mode, relaxed decisions", "perplexity_relaxed")
    if args.recall_pairs > 0:
        try:
            report["recall"] = recall_probe(model, tokenizer, args.recall_pairs, args.recall_trials)
        except ValueError as e:
            raise _StageFailed(f"recall probe: {e}") from e
        print(f"recall: {report['recall']['accuracy']:.0%} of {args.recall_trials} trials "
              f"({args.recall_pairs} pairs each)", flush=True)
        save()
    for seq_len in args.seq_lens[1:]:
        _other_window(args, model, tokenizer, texts, is_dmc, seq_len, report)
        save()
    if args.ruler_lengths:
        _ruler(args, model, tokenizer, texts, is_dmc, report, save)


def _other_window(args, model, tokenizer, texts, is_dmc: bool, seq_len: int, report: dict) -> None:
    """Perplexity (and, for DMC, through the compressed cache with its realized CR) at one more window
    length, under ``report["by_seq_len"][seq_len]``; the first length's figures are the top-level ones."""
    from ..eval import perplexity

    common = dict(seq_len=seq_len, max_windows=args.max_windows, batch_size=args.batch_size, progress=True)
    row: dict = {}
    try:
        full = perplexity(model, tokenizer, texts, mode="full", **common)
        row.update(perplexity_full_sequence=full.perplexity, windows=full.windows)
        line = f"perplexity at {seq_len} tokens: {full.perplexity:.3f} (full sequence"
        if is_dmc:
            cached = perplexity(model, tokenizer, texts, mode="cache", **common)
            row.update(perplexity_compressed_cache=cached.perplexity, realized_cr=cached.compression.overall_cr)
            line += f"), {cached.perplexity:.3f} (compressed cache, realized CR {row['realized_cr']:.2f}"
    except ValueError as e:
        raise _StageFailed(f"perplexity at {seq_len} tokens: {e}") from e
    report.setdefault("by_seq_len", {})[str(seq_len)] = row
    print(line + f"; {full.windows} windows)", flush=True)


def _ruler(args, model, tokenizer, texts, is_dmc: bool, report: dict, save) -> None:
    """The RULER-style tasks through the model's own cache, then (DMC) each of ``--baselines`` with a
    budget of ceil(length / DMC's realized CR at that length) slots per KV head."""
    from ..baselines import EvictionCache, EvictionPolicy, budget_for
    from ..eval.ruler import TASKS, make_ruler_trials, ruler_eval

    try:
        trials = make_ruler_trials(tokenizer, texts, tasks=args.ruler_tasks or TASKS, lengths=args.ruler_lengths,
                                   depths=args.ruler_depths, trials=args.ruler_trials)
    except ValueError as e:
        raise _StageFailed(f"RULER tasks: {e}") from e

    def show(name: str, result: dict) -> None:
        per_length: dict[str, list[float]] = {}
        for task in result["by_task"].values():
            for n, by_depth in task.items():
                per_length.setdefault(n, []).extend(by_depth.values())
        cells = ", ".join(f"{n} tokens {sum(v) / len(v):.0%}" for n, v in per_length.items())
        print(f"RULER ({name}): {result['accuracy']:.0%} of {result['trials']} trials ({cells})", flush=True)

    result = ruler_eval(model, tokenizer, trials)
    report["ruler"] = {k: v for k, v in result.items() if k != "outputs"}
    show("DMC, compressed cache" if is_dmc else "full attention", result)
    save()
    if not args.baselines:
        return
    base = _baseline_model(args, model)
    report["ruler_baselines"] = {"evicts_on": args.baseline_model or f"{args.model} (uncompressed)"}
    for method in args.baselines:
        rows = {}
        for length in args.ruler_lengths:
            cr = result["compression"][str(length)]["cr"]
            policy = EvictionPolicy(method, budget=budget_for(length, cr))
            chosen = [t for t in trials if t.length == length]
            got = ruler_eval(base, tokenizer, chosen, cache_factory=lambda n, p=policy: EvictionCache(base.config, p))
            rows[str(length)] = {"budget": policy.budget, "dmc_cr": cr, **{k: v for k, v in got.items()
                                                                           if k != "outputs"}}
            show(f"{method} at DMC's {policy.budget} slots, {length} tokens", got)
        report["ruler_baselines"][method] = rows
        save()


def _baseline_model(args, model):
    """The model the eviction baselines run on, converted and in vanilla mode (every token appends)."""
    import copy

    import transformers

    from ..config import is_dmc
    from ..hf.convert import convert

    if args.baseline_model is None:
        base = copy.deepcopy(model)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(args.baseline_model, dtype=model.dtype)
        base = base.to(next(model.parameters()).device).eval()
        if not is_dmc(base):
            base = convert(base)
    base.set_dmc_mode(vanilla=True)
    return base.eval()


def _save_or_print(save, report: dict) -> bool:
    """Write the report; if that fails, print it on stdout so that nothing is lost. True if written."""
    try:
        save()
        return True
    except OSError as e:
        print(f"error: the report could not be written ({e.strerror or e}); here it is:", file=sys.stderr)
        print(json.dumps(_finite(report), indent=1))
        return False


def _summary(report: dict, is_dmc: bool) -> str:
    summary = f"perplexity {report['perplexity_full_sequence']:.3f} (full sequence)"
    if is_dmc and "perplexity_relaxed" in report:
        summary += (f", {report['perplexity_compressed_cache']:.3f} (compressed cache); "
                    f"realized CR {report['compression']['cr']:.2f}; {report['perplexity_relaxed']:.3f} in training "
                    "mode (relaxed decisions)")
    if "recall" in report:
        summary += f"; recall {report['recall']['accuracy']:.0%} of {report['recall']['trials']}"
    if "ruler" in report:
        summary += f"; RULER {report['ruler']['accuracy']:.0%} of {report['ruler']['trials']}"
    return summary
