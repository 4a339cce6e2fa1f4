"""Fold round 2 of the real-model study (experiments/real_model/gpu_round2.sh, unpacked results.tgz)
into the docs files that experiments/real_model/collect.py wrote from round 1:

- docs/results/real_quality.json: + the H2O/TOVA rows at 4x and 8x (same held-out windows);
- docs/results/real_ablation.json: + the round-2 variants (one setting changed from round 1's recipe);
- docs/results/real_quality.md: re-rendered, with a section on the round-2 runs at 2x and 8x;
- docs/results/real_round2/: each study's report, results.json, metrics and logs (no weights).

    python experiments/real_model/collect_round2.py RESULTS_DIR --out docs/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from collect import dmc_row, read, render, slim, write_with_section  # noqa: E402

VARIANTS = {  # round-2 study directory -> (ablation label, the round-1 label it replaces, if any)
    "d4-dual0.5": ("dual-ascent rate 0.5 instead of 3", None),
    "d4-ceil8": ("per-head CR ceiling 8 (2x the target)", None),
    "d4-dual0.5-ceil8": ("dual rate 0.5 + per-head CR ceiling 8", None),
    "d4-dual0.5-ceil8-kdonly": ("dual rate 0.5 + ceiling 8 + distillation only (lm_weight 0)", None),
    "d4-hinge": ("fixed CR-loss weight (hinge of spec §4) instead of the dual-ascent multiplier",
                 "fixed CR-loss weight (hinge of spec §4) instead of the dual-ascent multiplier"),
    "d4-scale1": ("decision-logit scale 1 instead of 10", "decision-logit scale 1 instead of 10"),
}
OTHER_CRS = {"d2-dual0.5-ceil4": "DMC 2x, dual rate 0.5 + per-head ceiling 4",
             "d8-dual0.5-ceil16": "DMC 8x, dual rate 0.5 + per-head ceiling 16"}


def copy_raw(root: pathlib.Path, dest: pathlib.Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for study in sorted((root / "study").iterdir()):
        target = dest / study.name
        target.mkdir(exist_ok=True)
        for name in ("results.json", "results.md"):
            if (study / name).exists():
                shutil.copy(study / name, target / name)
        for png in study.glob("*.png"):
            shutil.copy(png, target / png.name)
        for metrics in study.glob("runs/*/model/run/metrics.jsonl"):
            shutil.copy(metrics, target / f"metrics_{metrics.parents[2].name}.jsonl")
    (dest / "logs").mkdir(exist_ok=True)
    for log in (root / "logs").glob("*.log"):
        shutil.copy(log, dest / "logs" / log.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the unpacked results.tgz of gpu_round2.sh (holds study/, logs/)")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    root, out = pathlib.Path(args.results), pathlib.Path(args.out)
    quality, ablation_doc = read(out / "real_quality.json"), read(out / "real_ablation.json")
    if quality is None or ablation_doc is None:
        raise SystemExit(f"{out}/real_quality.json and real_ablation.json (round 1, collect.py) are needed first")
    rows = quality["rows"]
    plain = next(r for r in rows if r["method"] == "plain")
    original = next(r for r in rows if r["method"] == "original")

    evict = read(root / "study" / "evict" / "results.json")
    if evict is None:
        raise SystemExit(f"{root}/study/evict/results.json is missing: run `dmc study --out ... --report-only` there")
    new = [slim(r) for r in evict["rows"] if r["method"] in ("h2o", "tova")]
    for r in new:
        r["ratio_to_plain"] = r["perplexity"] / plain["perplexity"]
        r["ratio_to_original"] = r["perplexity"] / original["perplexity"]
        r["round"] = 2
    keep = [r for r in rows if not (r["method"] in ("h2o", "tova") and r.get("round") == 2)]
    quality["rows"] = keep + new
    done = {r["run"] for r in new}
    quality["pending"] = [p for p in quality.get("pending", []) if p["run"] not in done]
    quality["meta"]["round2"] = {"orchestration": "experiments/real_model/gpu_round2.sh",
                                 "gpu": evict["meta"]["device"], "commands": evict["meta"]["commands"],
                                 "note": "H2O/TOVA at the nominal budgets (4x: 256, 8x: 128 of 1024 slots per KV "
                                         "head); DMC's realized CRs were below the targets, so budgets matched to "
                                         "them would give the eviction baselines more slots, not fewer"}
    (out / "real_quality.json").write_text(json.dumps(quality, indent=1))

    ablation = [r for r in ablation_doc["rows"] if r.get("round") != 2]
    replaced = {label for label, old in VARIANTS.values() if old}
    ablation = [r for r in ablation if not (r["variant"] in replaced and r.get("status"))]
    for name, (label, _) in VARIANTS.items():
        row = dmc_row(root / "study" / name)
        if row is None:
            ablation.append({"variant": label, "study": name, "status": "not finished", "round": 2})
            continue
        row["ratio_to_plain"] = row["perplexity"] / plain["perplexity"]
        ablation.append({"variant": label, "study": name, "round": 2, **row})
    others = []
    for name, label in OTHER_CRS.items():
        row = dmc_row(root / "study" / name)
        if row is not None:
            row["ratio_to_plain"] = row["perplexity"] / plain["perplexity"]
            others.append({"variant": label, "study": name, "round": 2, **row})
    ablation_doc["rows"] = ablation
    ablation_doc["other_crs"] = others
    ablation_doc["meta"]["round2"] = quality["meta"]["round2"]
    (out / "real_ablation.json").write_text(json.dumps(ablation_doc, indent=1))

    copy_raw(root, out / "real_round2")
    text = render(quality, ablation, read(out / "real_engine_check.json"))
    lines = ["", "## Round 2 at 2x and 8x (one setting changed from the round-1 recipe)", "",
             "| variant | target CR | realized CR | perplexity | vs plain | worst CR lag behind the ramp | "
             "head CR min–max |", "|---|---|---|---|---|---|---|"]
    for r in others:
        lines.append(f"| {r['variant']} | {r['target_cr']:g} | {r['realized_cr']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['ratio_to_plain']:.3f} | {r.get('max_shortfall_vs_ramp', 0):.1%} | "
                     f"{r.get('head_cr_min', 0):.2f}–{r.get('head_cr_max', 0):.2f} |")
    lines += ["", "Round 2 (H2O/TOVA rows, the ablation rows of round 2 and this section) ran from "
              "`experiments/real_model/gpu_round2.sh`; its reports, metrics and logs are in `real_round2/`.", ""]
    write_with_section(out, text, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
