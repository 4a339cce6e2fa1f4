"""Merges a study's per-run result files into ``results.json``, ``results.md`` and plots.

Works from the directory alone (``dmc study --out DIR --report-only``), with whatever runs have
finished: the others are listed as pending.
"""

from __future__ import annotations

import datetime
import pathlib

from .runner import read_json, write_json
from .settings import STUDY_FILE, Run, StudyError, StudySettings, plan_runs, plain_run

ORDER = ["original", "plain", "dmc", "gqa", "h2o", "tova", "snapkv"]
STYLE = {"dmc": ("DMC", "tab:blue", "o", "-"), "gqa": ("GQA (up-trained)", "tab:orange", "s", "-"),
         "h2o": ("H2O", "tab:green", "^", "-"), "tova": ("TOVA", "tab:red", "v", "-"),
         "snapkv": ("SnapKV", "tab:purple", "D", "-")}


def load_study(root: pathlib.Path) -> dict:
    study = read_json(root / STUDY_FILE)
    if study is None:
        raise StudyError(f"{root} holds no study ({STUDY_FILE} missing): run `dmc study MODEL ... --out {root}` first")
    return study


def collect(root: pathlib.Path, study: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows, skipped runs, pending runs) from the result files."""
    settings = StudySettings(**study["settings"])
    rows, skipped, pending = [], [], []
    planned = plan_runs(settings)
    found = {p.parent.name: read_json(p) for p in sorted((root / "runs").glob("*/result.json"))}
    for run in planned:
        result = found.pop(run.dirname, None)
        if result is None:
            pending.append({"run": run.name, "why": "not run yet (or running)"})
            continue
        rows += result["rows"]
        if result["status"] in ("skipped", "failed"):
            skipped.append({"run": run.name, "reason": result["reason"], "status": result["status"]})
        elif result["status"] == "partial":
            pending.append({"run": run.name, "why": result["waiting"]})
    for result in found.values():  # runs of settings no longer planned (e.g. another plain layout)
        rows += result["rows"]
    rows.sort(key=lambda r: (ORDER.index(r["method"]), r["target_cr"] or 0, r.get("budget_kind") == "matched"))
    _add_ratios(rows, settings)
    return rows, skipped, pending


def _add_ratios(rows: list[dict], settings: StudySettings) -> None:
    """Perplexity relative to the original and to plain continued training on the same tokens
    (the plain run of the same CR when the plans differ per CR)."""
    original = next((r for r in rows if r["method"] == "original"), None)
    plains = {r["run"]: r for r in rows if r["method"] == "plain"}
    for r in rows:
        if r["method"] == "plain":
            plain = r
        elif r["method"] == "original":
            plain = next(iter(plains.values())) if len(plains) == 1 else None
        else:
            plain = plains.get(plain_run(settings, r["target_cr"]).name)
        r["ratio_to_plain"] = r["perplexity"] / plain["perplexity"] if plain else None
        r["ratio_to_original"] = r["perplexity"] / original["perplexity"] if original else None


def write_report(root: pathlib.Path) -> dict:
    """results.json, results.md and the plots of the study in ``root``; returns results.json's content."""
    import torch
    import transformers
    study = load_study(root)
    rows, skipped, pending = collect(root, study)
    devices = sorted({r["device"] for r in rows if r.get("device")} | {i["device"] for i in study["invocations"]})
    s = study["settings"]
    meta = {
        "device": devices[0] if len(devices) == 1 else devices, "model": study["model"], "data": s["data"],
        "heldout": {"sources": s["heldout"], "files": len(study["heldout_files"])},
        "evaluation": {"window_tokens": study["eval_seq_len"], "max_windows": s["eval_windows"],
                       "batch_size": s["eval_batch_size"], "dtype": s["eval_dtype"],
                       "order": "held-out documents shuffled with a fixed seed, non-overlapping windows"},
        "commands": [i["command"] for i in study["invocations"]], "settings": s,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    plots, plot_note = _plots(root, rows)
    meta["plots"] = plots or plot_note
    result = {"meta": meta, "rows": rows, "skipped": skipped, "pending": pending}
    write_json(root / "results.json", result)
    (root / "results.md").write_text(render_markdown(result, plots, plot_note))
    return result


# ------------------------------------------------------------------------------ markdown
def _num(value, fmt: str, none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def _tokens(n) -> str:
    if not n:
        return "–"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _label(r: dict) -> str:
    if r["method"] == "original":
        return "original"
    if r["method"] == "plain":
        return "plain continued training" + (f" (plan of CR {r['plan_of_cr']:g})" if r.get("plan_of_cr") else "")
    name = {"dmc": "DMC", "gqa": "GQA up-trained", "h2o": "H2O", "tova": "TOVA", "snapkv": "SnapKV"}[r["method"]]
    return name + (f", {r['budget_kind']} budget" if "budget_kind" in r else "")


def render_markdown(result: dict, plots: list[str], plot_note: str | None) -> str:
    meta, rows = result["meta"], result["rows"]
    model = meta["model"]
    ev = meta["evaluation"]
    device = meta["device"] if isinstance(meta["device"], str) else ", ".join(meta["device"])
    lines = [f"# dmc study: {pathlib.Path(model['path']).name}", "",
             "Written by `dmc study` from the runs' result files; raw numbers in `results.json`.", "",
             f"- **Model**: `{model['path']}` ({model['model_type']}, {model['layers']} layers, {model['heads']} "
             f"heads / {model['kv_heads']} KV heads of {model['head_dim']}).",
             f"- **Training data**: {', '.join(f'`{d}`' for d in meta['data'])}. **Held out**: "
             f"{', '.join(f'`{d}`' for d in meta['heldout']['sources'])} ({meta['heldout']['files']} file"
             f"{'s' if meta['heldout']['files'] != 1 else ''}).",
             f"- **Evaluation**: up to {ev['max_windows']} windows of {ev['window_tokens']} held-out tokens, the same "
             f"for every model, {ev['dtype']}. DMC: through its compressed cache (hard decisions, as at inference); "
             "H2O/TOVA/SnapKV: token by token through the eviction cache, a budget of ⌈window / CR⌉ slots per KV head, "
             "at the nominal CR and matched to DMC's realized CR.",
             f"- **Device**: {device}; torch {meta['torch']}, transformers {meta['transformers']}.", "",
             "| run | model | target CR | KV budget | realized CR | perplexity | vs plain | vs original | "
             "hard − relaxed (nats) | train tokens | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {_label(r)} | {_num(r['target_cr'], 'g')} | {_num(r.get('budget'), 'd')} | "
            f"{r['realized_cr']:.3f} | {r['perplexity']:.4f} | {_num(r['ratio_to_plain'], '.3f')} | "
            f"{_num(r['ratio_to_original'], '.3f')} | {_num(r.get('relaxed_gap'), '+.4f')} | {_tokens(r['tokens'])} | "
            f"{_num(r['train_seconds'] and r['train_seconds'] / 60, '.1f')}{' min' if r['train_seconds'] else ''} |")
    if not rows:
        lines.append("| (no finished run yet) |||||||||||")
    lines += ["", "Realized CR: tokens per kept KV slot on the held-out windows (DMC: counted in its cache; GQA: "
              "original KV heads / its own; H2O/TOVA/SnapKV: what the cache kept). *vs plain*: perplexity over plain "
              "continued training of the original on the same tokens. Train time: optimizer steps only."]
    if result["skipped"]:
        lines += ["", "Skipped or failed:"] + [f"- {s['run']}: {s['reason']}" for s in result["skipped"]]
    if result["pending"]:
        lines += ["", "Pending (run `dmc study` again on this directory):"]
        lines += [f"- {p['run']}: {p['why']}" for p in result["pending"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{pathlib.Path(p).stem}]({p})" for p in plots]
    elif plot_note:
        lines += ["", f"Plots: {plot_note}."]
    lines += ["", "## Commands", ""] + [f"    {c}" for c in meta["commands"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plots
def _plots(root: pathlib.Path, rows: list[dict]) -> tuple[list[str], str | None]:
    """Perplexity over realized CR per method, and DMC's per-head CR heatmaps (paths relative
    to ``root``); or a note when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return [], "not drawn: matplotlib is not installed (pip install matplotlib)"
    if not rows:
        return [], None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..eval import compression_heatmap
    from ..stats import CompressionStats
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, (label, color, marker, _) in STYLE.items():
        for kind, style in ((None, "-"), ("matched", "-"), ("nominal", ":")):
            points = sorted((r["realized_cr"], r["perplexity"]) for r in rows
                            if r["method"] == method and r.get("budget_kind") == kind)
            if points:
                ax.plot(*zip(*points), marker=marker, color=color, linestyle=style,
                        label=label + (f" ({kind} budget)" if kind else ""))
    for r in rows:
        if r["method"] in ("original", "plain"):
            ax.axhline(r["perplexity"], color="gray", linestyle=":" if r["method"] == "original" else "--",
                       label=_label(r))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("realized compression ratio (tokens per KV slot)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "perplexity_vs_cr.png", dpi=120)
    plt.close(fig)
    written.append("perplexity_vs_cr.png")
    for r in rows:
        per_head = (r.get("compression") or {}).get("per_head_cr")
        if r["method"] == "dmc" and per_head:
            cr = torch.tensor(per_head, dtype=torch.float64)[:, None, :]  # every head sees the same tokens
            name = f"heads_{Run('dmc', r['target_cr']).dirname}.png"
            compression_heatmap(CompressionStats(tokens=torch.ones_like(cr), slots=1 / cr), root / name,
                                title=f"DMC {r['target_cr']:g}x: realized CR")
            written.append(name)
    return written, None


def report_summary(result: dict) -> str:
    """One line for the terminal."""
    done = len({r["run"] for r in result["rows"]})
    return (f"{done} run(s) in the report, {len(result['skipped'])} skipped, {len(result['pending'])} pending"
            + (f" ({', '.join(p['run'] for p in result['pending'])})" if result["pending"] else ""))


__all__ = ["collect", "load_study", "render_markdown", "report_summary", "write_report"]
