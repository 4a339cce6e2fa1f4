"""Fold round 5 of the real-model study (experiments/real_model/gpu_round5.sh, unpacked results.tgz) into
the docs files rounds 1-4 wrote:

- docs/results/real_quality.json: + H2O and TOVA at the budgets matched to the reported DMC rows (4x: round
  4's realized CR 3.9535 -> 260 slots; 8x: round 3's 7.9086 -> 130 slots; the studies ran them as target CR
  3.9535 / 7.9086, stored here as target 4 / 8 with ``budget_kind: matched``, ``budget_cr`` and
  ``matched_round``), and DMC 4x trained again with the default recipe (``variant: reproduction``), each
  with ``round: 5``;
- docs/results/real_engine_check.json: the engine on round 5's DMC 4x model (``round5``);
- docs/results/kv_fp8_quality.{json,md}: the fp8 KV-cache quality run, if it ran;
- docs/results/real_quality.md: re-rendered (rounds 3 and 4 kept), with a round-5 section and the targets of
  issue #12 recomputed on the rows (not typed);
- docs/results/real_round5/: each study's report, results.json, metrics and logs (no weights);
- docs/benchmarks.md: the `dmc serve` sections on the real model (serve_real.md), if they ran;
- docs/throughput_runs/h200_round5_gpu_tests.txt: the GPU test log.

    python experiments/real_model/collect_round5.py RESULTS_DIR --out docs/results
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
from _report import write_section  # noqa: E402
from collect import dmc_row, engine_lines, read, render, slim  # noqa: E402
from collect_round2 import copy_raw  # noqa: E402
from collect_round4 import _ratio, earlier_rounds, kept_section, round_arguments, targets  # noqa: E402

MATCHED = {"3.9535": (4.0, 4), "7.9086": (8.0, 3)}  # study CR -> (target CR it matches, round of that DMC row)


def study_gpu(root: pathlib.Path) -> str | None:
    """The device the round's studies name (their results.json meta)."""
    for path in sorted((root / "study").glob("*/results.json")):
        device = (read(path) or {}).get("meta", {}).get("device")
        if device:
            return device
    return None


def eviction_rows(root: pathlib.Path, plain: dict, original: dict) -> tuple[list[dict], list[str]]:
    rows, commands = [], []
    for cr, (target, matched_round) in MATCHED.items():
        for method in ("h2o", "tova"):
            study = read(root / "study" / f"{method}-{cr}" / "results.json")
            if study is None:
                continue
            commands += study["meta"]["commands"]
            for r in study["rows"]:
                if r["method"] != method or r.get("status"):
                    continue
                row = _ratio(slim(r), plain, original)
                row.update(round=5, target_cr=target, budget_kind="matched", budget_cr=float(cr),
                           matched_round=matched_round)
                rows.append(row)
    return rows, commands


def reproduction_row(root: pathlib.Path, plain: dict, original: dict) -> tuple[dict | None, list[str]]:
    study = read(root / "study" / "d4" / "results.json")
    if study is None:
        return None, []
    r = next((r for r in study["rows"] if r["method"] == "dmc" and not r.get("status")), None)
    if r is None:
        return None, study["meta"]["commands"]
    row = _ratio(slim(r), plain, original)
    row.update(dmc_row(root / "study" / "d4") or {})
    run = read(root / "study" / "d4" / "runs" / "dmc-4x" / "model" / "run" / "run.json") or {}
    row.update(round=5, variant="reproduction", merge_delay=(run.get("config") or run).get("merge_delay"),
               budget_slots=round(1024 / row["realized_cr"]), recipe="default (no lever set on the command line)")
    return _ratio(row, plain, original), study["meta"]["commands"]


def serve_sections(path: pathlib.Path, benchmarks: pathlib.Path) -> list[str]:
    """Copy each section serve_load.py wrote into serve_real.md to docs/benchmarks.md; their titles."""
    if not path.exists():
        return []
    titles = []
    for match in re.finditer(r"<!-- (.+?):begin -->\n(.*?)<!-- \1:end -->", path.read_text(), re.S):
        write_section(benchmarks, match.group(1), match.group(2).strip())
        titles.append(match.group(1))
    return titles


def main() -> int:
    args = round_arguments(__doc__, "gpu_round5.sh")
    root, out = pathlib.Path(args.results), pathlib.Path(args.out)
    quality, rows, plain, original = earlier_rounds(out, 5)
    control = next((r for r in rows if r.get("variant") == "plain+distill"), None)
    new, commands = eviction_rows(root, plain, original)
    repro, more = reproduction_row(root, plain, original)
    commands += more
    if repro is not None:
        new.append(repro)
    if not new:
        raise SystemExit(f"no round-5 results under {root}/study")
    quality["rows"] = rows + new
    quality["meta"]["round5"] = {
        "orchestration": "experiments/real_model/gpu_round5.sh", "gpu": study_gpu(root), "commands": sorted(set(commands)),
        "note": "H2O/TOVA at the budgets matched to the reported DMC rows (ceil(1024 / realized CR)); DMC 4x "
                "retrained with the default recipe as a reproduction of round 4; same data, tokens, windows and "
                "evaluation as rounds 1-4" + (f"; {args.note}" if args.note else "")}
    (out / "real_quality.json").write_text(json.dumps(quality, indent=1))

    engine_doc = read(out / "real_engine_check.json") or {}
    check = read(root / "engine_check.json")
    if check is not None:
        engine_doc["round5"] = {"model": "DMC 4x, default recipe (merge_delay 32), round 5", **check}
        (out / "real_engine_check.json").write_text(json.dumps(engine_doc, indent=1))
    for name in ("kv_fp8_quality.json", "kv_fp8_quality.md"):
        if (root / "kv_fp8" / name).exists():
            shutil.copy(root / "kv_fp8" / name, out / name)
    copy_raw(root, out / "real_round5")
    docs = out.parent
    served = serve_sections(root / "serve_real.md", docs / "benchmarks.md")
    if (root / "logs" / "gpu-tests.log").exists():
        shutil.copy(root / "logs" / "gpu-tests.log", docs / "throughput_runs" / "h200_round5_gpu_tests.txt")

    ablation = (read(out / "real_ablation.json") or {}).get("rows", [])
    kept = kept_section(out / "real_quality.md", "## Round 3") + kept_section(out / "real_quality.md", "## Round 4")
    text = render(quality, ablation, {k: v for k, v in engine_doc.items() if not k.startswith("round")})
    lines = kept + ["", "## Round 5: eviction at the matched budgets, the engine and the server on the retrofit", "",
                    "H2O and TOVA on the original model at the budgets matched to the reported DMC rows' realized "
                    "slots (4x: round 4's DMC, 260 of 1024 slots; 8x: round 3's DMC with merge_delay 32, which is the "
                    "default recipe at 8x, 130 slots)."]
    if repro is not None:
        lines[-1] += (f" DMC 4x trained again with the default recipe (a reproduction of round 4's row): perplexity "
                      f"{repro['perplexity']:.3f}, realized CR {repro['realized_cr']:.3f}"
                      f" (round 4: {next(r for r in rows if r['method'] == 'dmc' and r.get('round') == 4)['perplexity']:.3f}).")
    lines += ["", "The targets of issue #12 on the reported row at each CR:", ""]
    lines += targets(quality["rows"], plain, control)
    if check is not None:
        lines += ["", "The engine on round 5's DMC 4x model (delayed merging, merge_delay 32):", ""]
        lines += engine_lines(check)
    if served:
        lines += ["", "`dmc serve` on the real model: " + "; ".join(f"\"{t}\"" for t in served)
                  + " in `docs/benchmarks.md`."]
    lines += ["", "Round 5 ran from `experiments/real_model/gpu_round5.sh`; its reports, metrics and logs are in "
              "`real_round5/`." + (f" {args.note}." if args.note else ""), ""]
    marker = "\n## Commands"
    (out / "real_quality.md").write_text(text.replace(marker, "\n".join(lines) + marker, 1))
    print((out / "real_quality.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
