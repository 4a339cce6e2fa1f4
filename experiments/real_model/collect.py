"""Turn what experiments/real_model/gpu_study.sh left (unpacked results.tgz) into the docs files:

- docs/results/real_quality.json: rows (method, target_cr, realized_cr, perplexity, tokens, ...) of the
  main study; meta (gpu, model, data, held-out set, commands, settings);
- docs/results/real_ablation.json: DMC 4x with one recipe lever changed per row;
- docs/results/real_engine_check.json: the engine on the retrofitted model;
- docs/results/real_quality.md: the tables, the targets of issue #12 with the measured values.

    python experiments/real_model/collect.py RESULTS_DIR --out docs/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

ABLATIONS = {  # study directory -> what differs from the main recipe
    "abl-paper": "paper preset: no lever (logit scale 1, fixed CR weight, LM loss only, constant noise, no hard stage)",
    "abl-no-distill": "no distillation (LM loss only)",
    "abl-no-anneal": "no noise annealing and no hard stage (fine-tune with constant noise)",
    "abl-hinge": "fixed CR-loss weight (hinge of spec §4) instead of the dual-ascent multiplier",
    "abl-scale1": "decision-logit scale 1 instead of 10",
}


def read(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def slim(row: dict) -> dict:
    keep = ("run", "method", "target_cr", "realized_cr", "perplexity", "tokens", "budget", "budget_kind", "budget_cr",
            "relaxed_gap", "ratio_to_plain", "ratio_to_original", "train_seconds")
    out = {k: row[k] for k in keep if k in row}
    if "train" in row:
        out["final_train_cr"] = row["train"].get("final_achieved_cr")
    return out


def last_eval(study: pathlib.Path, run: str) -> dict:
    """The trainer's last evaluation record (diagnostics) of a run."""
    metrics = study / "runs" / run / "model" / "run" / "metrics.jsonl"
    if not metrics.exists():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in records if "val_loss" in r]
    return evals[-1] if evals else {}


def cr_lag(study: pathlib.Path, run: str) -> dict:
    """Largest relative shortfall of the achieved (training) CR behind the schedule after the
    first tenth of the ramp, and the achieved/target pairs at a few points."""
    metrics = study / "runs" / run / "model" / "run" / "metrics.jsonl"
    if not metrics.exists():
        return {}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    ramp = [r for r in records if r.get("stage") == "retrofit"]
    if not ramp:
        return {}
    later = ramp[len(ramp) // 10:]
    worst = max((r["target_cr"] - r["achieved_cr"]) / r["target_cr"] for r in later)
    marks = [ramp[int(f * (len(ramp) - 1))] for f in (0.25, 0.5, 0.75, 1.0)]
    return {"max_shortfall_vs_ramp": round(worst, 4),
            "ramp_points": [[r["step"], round(r["target_cr"], 3), round(r["achieved_cr"], 3)] for r in marks]}


def dmc_row(study: pathlib.Path) -> dict | None:
    """The DMC row of a one-run study directory, with its CR lag and last per-head diagnostics."""
    result = read(study / "results.json")
    row = next((slim(r) for r in (result or {}).get("rows", []) if r["method"] == "dmc"), None)
    if row is None:
        return None
    run = f"dmc-{row['target_cr']:g}x"
    row.update(cr_lag(study, run))
    diag = last_eval(study, run)
    row.update({k: diag[k] for k in ("head_cr_min", "head_cr_max", "head_cr_hist") if k in diag})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the unpacked results.tgz (holds study/, logs/)")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    root, out = pathlib.Path(args.results), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main_study = read(root / "study" / "main" / "results.json")
    if main_study is None:
        raise SystemExit(f"{root}/study/main/results.json is missing: run `dmc study --out ... --report-only` there")
    meta = main_study["meta"]
    rows = [slim(r) for r in main_study["rows"]]
    for row in rows:
        if row["method"] == "dmc":
            run = f"dmc-{row['target_cr']:g}x"
            diag = last_eval(root / "study" / "main", run)
            row.update({k: diag[k] for k in ("head_cr_min", "head_cr_max", "head_cr_hist", "logit_near_threshold")
                        if k in diag})
            row.update(cr_lag(root / "study" / "main", run))
    quality = {"meta": {"gpu": meta["device"], "model": meta["model"], "data": meta["data"],
                        "heldout": meta["heldout"], "evaluation": meta["evaluation"], "commands": meta["commands"],
                        "settings": meta["settings"], "torch": meta["torch"], "transformers": meta["transformers"],
                        "orchestration": "experiments/real_model/gpu_study.sh"},
               "rows": rows, "pending": main_study.get("pending", [])}
    (out / "real_quality.json").write_text(json.dumps(quality, indent=1))

    ablation = []
    reference = next((r for r in rows if r["method"] == "dmc" and r["target_cr"] == 4.0), None)
    if reference:
        ablation.append({"variant": "main recipe (all levers)", **reference})
    for name, what in ABLATIONS.items():
        dmc = dmc_row(root / "study" / name)
        if dmc is None:
            ablation.append({"variant": what, "status": "not finished"})
            continue
        plain = next((r for r in rows if r["method"] == "plain"), None)
        if plain:
            dmc["ratio_to_plain"] = dmc["perplexity"] / plain["perplexity"]
        ablation.append({"variant": what, "study": name, **dmc})
    (out / "real_ablation.json").write_text(json.dumps({"meta": quality["meta"], "rows": ablation}, indent=1))
    engine = root / "engine_check.json"
    if engine.exists():
        shutil.copy(engine, out / "real_engine_check.json")
    (out / "real_quality.md").write_text(render(quality, ablation, read(engine)))
    print((out / "real_quality.md").read_text())
    return 0


def write_with_section(out: pathlib.Path, text: str, lines: list[str]) -> None:
    """Write real_quality.md: ``text`` (from :func:`render`) with a round's section before its Commands."""
    marker = "\n## Commands"
    text = text.replace(marker, "\n".join(lines) + marker, 1)
    (out / "real_quality.md").write_text(text)
    print(text)


def _f(value, fmt):
    return "–" if value is None else format(value, fmt)


def engine_lines(check: dict) -> list[str]:
    """engine_check.py's result as bullet lines: greedy agreement per dtype, realized CR engine vs dmc eval."""
    lines = []
    for key in ("fp32", "bf16"):
        if key in check:
            e = check[key]
            lines.append(f"- {key}: greedy tokens equal to HF `generate()` for {e['equal']} of {e['prompts']} "
                         f"prompts ({e['new_tokens']} new tokens each); first divergence per prompt: "
                         f"{e['first_divergence']}")
    if "realized_cr" in check:
        c = check["realized_cr"]
        lines.append(f"- realized CR after prefilling {c['windows']} windows of {c['tokens_per_window']} tokens: "
                     f"full-sequence (dmc eval) {c['eval_cr']}; engine {[round(x['cr'], 4) for x in c['engine']]}")
    return lines


def render(quality: dict, ablation: list[dict], engine: dict | None) -> str:
    meta, rows = quality["meta"], quality["rows"]
    lines = ["# Retrofitting a real pretrained model (SmolLM2-135M-Instruct)", "",
             "Written by `experiments/real_model/collect.py` from the output of `experiments/real_model/gpu_study.sh`"
             " (raw numbers: `real_quality.json`, `real_ablation.json`, `real_engine_check.json`).", "",
             f"- GPU: {meta['gpu']}; torch {meta['torch']}, transformers {meta['transformers']}",
             f"- Model: {meta['model']}", f"- Training data: {', '.join(meta['data'])}",
             f"- Held out: {', '.join(meta['heldout']['sources'])} ({meta['heldout']['files']} files); "
             f"{meta['evaluation']['max_windows']} windows of {meta['evaluation']['window_tokens']} tokens, "
             f"{meta['evaluation']['dtype']}", "",
             "| method | target CR | realized CR | perplexity | vs plain | vs original | tokens | relaxed gap (nats) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = (r["method"] + (f", merge_delay {r['merge_delay']}" if r.get("merge_delay") else "")
                 + (f" ({r['budget_kind']} budget {r.get('budget')})" if "budget_kind" in r else "")
                 + (f", round {r['round']}" if r.get("round") else ""))
        lines.append(f"| {label} | {_f(r.get('target_cr'), 'g')} | {_f(r.get('realized_cr'), '.3f')} | "
                     f"{_f(r.get('perplexity'), '.3f')} | {_f(r.get('ratio_to_plain'), '.3f')} | "
                     f"{_f(r.get('ratio_to_original'), '.3f')} | {_f((r.get('tokens') or 0) / 1e6, '.2f')}M | "
                     f"{_f(r.get('relaxed_gap'), '+.4f')} |")
    lines += ["", "## Ablation (DMC 4x, same tokens, one lever changed)", "",
              "| variant | realized CR | perplexity | vs plain | worst CR lag behind the ramp | relaxed gap | head CR min–max |",
              "|---|---|---|---|---|---|---|"]
    for r in ablation:
        if r.get("status"):
            lines.append(f"| {r['variant']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {_f(r.get('realized_cr'), '.3f')} | {_f(r.get('perplexity'), '.3f')} | "
                     f"{_f(r.get('ratio_to_plain'), '.3f')} | {_f(r.get('max_shortfall_vs_ramp'), '.1%')} | "
                     f"{_f(r.get('relaxed_gap'), '+.4f')} | {_f(r.get('head_cr_min'), '.2f')}–{_f(r.get('head_cr_max'), '.2f')} |")
    if engine:
        lines += ["", "## The engine on the retrofitted DMC 4x model", ""] + engine_lines(engine)
    lines += ["", "## Commands", ""] + [f"    {c}" for c in meta["commands"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
