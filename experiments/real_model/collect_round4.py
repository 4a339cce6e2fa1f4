"""Fold round 4 of the real-model study (experiments/real_model/gpu_round4.sh, unpacked results.tgz) into
the docs files rounds 1-3 wrote:

- docs/results/real_quality.json: + DMC 4x and 8x with the default recipe (merge_delay left to its
  default, which is 32 at both), H2O/TOVA at the budgets matched to those rows' realized CR, and the
  control "plain continued training + distillation from the original" (method ``plain``, variant
  ``plain+distill``), each row with ``round: 4``;
- docs/results/real_engine_check.json: the engine on the default-recipe DMC 4x model (``round4``), next
  to round 1's check of a merge_delay-0 model;
- docs/results/real_quality.md: re-rendered (round 3's section kept), with a round-4 section: the targets of
  issue #12 on the newest rows (computed here, not typed);
- docs/results/real_round4/: each study's report, results.json, metrics and logs (no weights).

    python experiments/real_model/collect_round4.py RESULTS_DIR --out docs/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from collect import dmc_row, engine_lines, read, render, slim  # noqa: E402
from collect_round2 import copy_raw  # noqa: E402

STUDIES = {4.0: "d4", 8.0: "d8"}
CONTROL = "plain-kd"


def _ratio(row: dict, plain: dict, original: dict) -> dict:
    row["ratio_to_plain"] = row["perplexity"] / plain["perplexity"]
    row["ratio_to_original"] = row["perplexity"] / original["perplexity"]
    return row


def newest_dmc(rows: list[dict]) -> dict[float, dict]:
    """Per target CR, the DMC row of the newest round with delayed merging (the current default)."""
    best: dict[float, dict] = {}
    for r in rows:
        if r["method"] == "dmc" and r.get("merge_delay", 0) > 0 and not r.get("variant"):  # not a reproduction
            if r["target_cr"] not in best or r.get("round", 1) > best[r["target_cr"]].get("round", 1):
                best[r["target_cr"]] = r
    return best


def eviction_for(rows: list[dict], method: str, dmc: dict) -> dict | None:
    """The eviction row matched to ``dmc`` (same round and CR), else the newest nominal one."""
    cands = [r for r in rows if r["method"] == method and r["target_cr"] == dmc["target_cr"]]
    # A matched row belongs to the DMC row of its round, or to the one it names (``matched_round``).
    matched = [r for r in cands if r.get("budget_kind") == "matched"
               and r.get("matched_round", r.get("round")) == dmc.get("round")]
    nominal = sorted((r for r in cands if r.get("budget_kind") == "nominal"), key=lambda r: r.get("round", 1))
    return matched[0] if matched else (nominal[-1] if nominal else None)


def targets(rows: list[dict], plain: dict, control: dict | None) -> list[str]:
    dmc = newest_dmc(rows)
    lines = ["| target (issue #12) | status | measured |", "|---|---|---|"]
    within = {cr: r["realized_cr"] / cr - 1 for cr, r in dmc.items()}
    lines.append(f"| realized CR within ±5% | {'**pass**' if all(abs(v) <= 0.05 for v in within.values()) else '**fail**'} | "
                 + ", ".join(f"{cr:g}x: {dmc[cr]['realized_cr']:.3f} ({v:+.1%}, round {dmc[cr]['round']})"
                             for cr, v in sorted(within.items())) + " |")
    for cr, limit in ((2.0, 1.01), (4.0, 1.03)):
        if cr in dmc:
            ratio = dmc[cr]["perplexity"] / plain["perplexity"]
            extra = (f"; vs plain + distillation {control['perplexity']:.3f}: "
                     f"{dmc[cr]['perplexity'] / control['perplexity']:.3f}×" if control else "")
            lines.append(f"| DMC {cr:g}x ≤ {limit} × plain continued training | {'**pass**' if ratio <= limit else '**fail**'} | "
                         f"{dmc[cr]['perplexity']:.3f} vs {plain['perplexity']:.3f} ({ratio:.3f}×, round "
                         f"{dmc[cr]['round']}){extra} |")
    for cr in sorted(dmc):
        parts, ok = [], True
        for method in ("h2o", "tova"):
            best = eviction_for(rows, method, dmc[cr])
            if best is None:
                parts.append(f"{method.upper()} not measured")
                ok = False
                continue
            ok = ok and dmc[cr]["perplexity"] < best["perplexity"]
            parts.append(f"{method.upper()} {best['perplexity']:.3f} ({best['budget_kind']} budget {best['budget']}, "
                         f"round {best.get('round', 1)})")
        lines.append(f"| DMC below H2O and TOVA at {cr:g}x | {'**pass**' if ok else '**fail**'} | DMC "
                     f"{dmc[cr]['perplexity']:.3f} ({dmc[cr]['budget_slots']} slots, round {dmc[cr]['round']}) vs "
                     + ", ".join(parts) + " |")
    gaps = {cr: r.get("relaxed_gap") for cr, r in dmc.items()}
    lines.append(f"| relaxed-vs-hard gap ≤ 0.02 nats | {'**pass**' if all(abs(g) <= 0.02 for g in gaps.values()) else '**fail**'} | "
                 + ", ".join(f"{cr:g}x: {g:+.4f}" for cr, g in sorted(gaps.items())) + " (hard − relaxed) |")
    return lines


def kept_section(path: pathlib.Path, title: str) -> list[str]:
    """An earlier round's section of real_quality.md (from its title to the next section), kept as is."""
    if not path.exists():
        return []
    text = path.read_text()
    start = text.find(title)
    if start < 0:
        return []
    end = text.find("\n## ", start + len(title))
    return ["", text[start:end if end >= 0 else None].rstrip()]


def round_arguments(doc: str, script: str) -> argparse.Namespace:
    """The command line every round's collect script takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("results", help=f"the unpacked results.tgz of {script} (holds study/, logs/)")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--note", default=None, help="what did not finish, for the meta")
    return parser.parse_args()


def earlier_rounds(out: pathlib.Path, this_round: int) -> tuple[dict, list[dict], dict, dict]:
    """real_quality.json without this round's rows (so a re-run replaces them): the document, the other
    rows, and the plain (LM loss only) and original rows the ratios are taken against."""
    quality = read(out / "real_quality.json")
    if quality is None:
        raise SystemExit(f"{out}/real_quality.json (rounds 1-{this_round - 1}) is needed first")
    rows = [r for r in quality["rows"] if r.get("round") != this_round]
    plain = next(r for r in rows if r["method"] == "plain" and not r.get("variant"))
    original = next(r for r in rows if r["method"] == "original")
    return quality, rows, plain, original


def main() -> int:
    args = round_arguments(__doc__, "gpu_round4.sh")
    root, out = pathlib.Path(args.results), pathlib.Path(args.out)
    quality, rows, plain, original = earlier_rounds(out, 4)
    new, commands, gpu = [], [], None
    for cr, name in STUDIES.items():
        study = read(root / "study" / name / "results.json")
        if study is None:
            continue
        gpu = gpu or study["meta"]["device"]
        commands += study["meta"]["commands"]
        for r in study["rows"]:
            if r["method"] not in ("dmc", "h2o", "tova") or r.get("status"):
                continue
            row = _ratio(slim(r), plain, original)
            row["round"] = 4
            if r["method"] == "dmc":
                row.update(dmc_row(root / "study" / name) or {})
                run = read(root / "study" / name / "runs" / f"dmc-{cr:g}x" / "model" / "run" / "run.json") or {}
                row["merge_delay"] = (run.get("config") or run).get("merge_delay")
                row["budget_slots"] = round(1024 / row["realized_cr"])
                row["recipe"] = "default (no lever set on the command line)"
                _ratio(row, plain, original)
            new.append(row)
    control = None
    study = read(root / "study" / CONTROL / "results.json")
    if study is not None:
        commands += study["meta"]["commands"]
        r = next((r for r in study["rows"] if r["method"] == "plain" and not r.get("status")), None)
        if r is not None:
            control = _ratio(slim(r), plain, original)
            control.update(round=4, variant="plain+distill", run="plain+distill")
            new.append(control)
    if not new:
        raise SystemExit(f"no round-4 results under {root}/study")
    quality["rows"] = rows + new
    done = {r["run"] for r in new if r["method"] in ("h2o", "tova")}
    quality["pending"] = [p for p in quality.get("pending", []) if p["run"] not in done]
    quality["meta"]["round4"] = {
        "orchestration": "experiments/real_model/gpu_round4.sh", "gpu": gpu, "commands": sorted(set(commands)),
        "note": "DMC rows of round 4 use the default recipe (merge_delay not given: 32 at 4x and 8x); the control "
                "is plain continued training with distill_weight=1 (LM loss + KL to the original, as DMC has); same "
                "4.92M tokens, data, windows and evaluation as rounds 1-3" + (f"; {args.note}" if args.note else "")}
    (out / "real_quality.json").write_text(json.dumps(quality, indent=1))

    engine_doc = read(out / "real_engine_check.json") or {}
    check = read(root / "engine_check.json")
    if check is not None:
        engine_doc = {k: v for k, v in engine_doc.items() if k != "round4"}
        engine_doc["round4"] = {"model": "DMC 4x, default recipe (merge_delay 32), round 4", **check}
        (out / "real_engine_check.json").write_text(json.dumps(engine_doc, indent=1))
    copy_raw(root, out / "real_round4")

    ablation = (read(out / "real_ablation.json") or {}).get("rows", [])
    round3 = kept_section(out / "real_quality.md", "## Round 3")
    text = render(quality, ablation, {k: v for k, v in engine_doc.items() if k != "round4"})
    crs = sorted(r["target_cr"] for r in new if r["method"] == "dmc")
    evicted = sorted({r["target_cr"] for r in new if r["method"] in ("h2o", "tova")})
    lines = round3 + ["", "## Round 4: the default recipe, and a distillation control", "",
                      f"DMC rows of round 4 ({', '.join(f'{cr:g}x' for cr in crs) or 'none'}) are `dmc retrofit` "
                      "with no lever on the command line (the default picks merge_delay 32 there). "
                      + (f"H2O and TOVA ran in the same studies at {', '.join(f'{cr:g}x' for cr in evicted)}, at the "
                         "budget matched to the row's realized CR. " if evicted else
                         "No H2O/TOVA row of round 4 finished: the eviction rows below are earlier rounds'. ")
                      + ("The control is plain continued training plus distillation from the original "
                         f"(distill_weight=1, as DMC has), same tokens: perplexity {control['perplexity']:.3f} "
                         f"({control['ratio_to_plain']:.3f}× plain LM-only, {control['ratio_to_original']:.3f}× the "
                         "original). " if control else "")
                      + "The targets of issue #12 on the newest row at each CR:", ""]
    lines += targets(quality["rows"], plain, control)
    if check is not None:
        lines += ["", "The engine on round 4's DMC 4x model (delayed merging):", ""]
        lines += engine_lines(check)
    lines += ["", "Round 4 ran from `experiments/real_model/gpu_round4.sh`; its reports, metrics and logs are in "
              "`real_round4/`." + (f" {args.note}." if args.note else ""), ""]
    marker = "\n## Commands"
    text = text.replace(marker, "\n".join(lines) + marker, 1)
    (out / "real_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
