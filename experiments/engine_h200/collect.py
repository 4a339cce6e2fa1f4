"""Fold what experiments/engine_h200/bench.sh measured on the H200 (its RESULTS_DIR, unpacked) into the docs:

- docs/results/throughput.json becomes the H200 rows (meta names the GPU); the H100 rows it held move, unchanged,
  to docs/results/throughput_h100.json, and their table to the section "throughput-h100" of docs/benchmarks.md
  (kept as history);
- the "throughput" section of docs/benchmarks.md is re-rendered from the H200 rows by benchmarks/throughput.py's
  own report;
- the decode and prefill profiles (profile_decode_*, profile_prefill_*: .json, .md) and the attention tile sweep
  (attention_sweep.{json,md}) go to docs/results/engine_h200/; the raw logs stay in RESULTS_DIR (not in git).

    python experiments/engine_h200/collect.py RESULTS_DIR [RESULTS_DIR ...] [--docs docs]

Several RESULTS_DIRs (bench.sh over several device calls on one code state) merge: their rows in order (a row,
by part, config and context, is taken from the first dir that has it), meta from the first with its
``command`` the list of every dir's; their profiles and logs are all copied.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
from _report import write_section  # noqa: E402
from throughput import report  # noqa: E402  (the table benchmarks/throughput.py itself writes)


def merge(results: list[dict]) -> dict:
    """One results file from several bench.sh dirs' (see the module docstring)."""
    if not results:
        raise SystemExit("no results/throughput.json in the given RESULTS_DIRs: run bench.sh's row steps first")
    gpus = {r["meta"]["gpu"] for r in results}
    if len(gpus) > 1:
        raise SystemExit(f"the RESULTS_DIRs were measured on different GPUs ({', '.join(sorted(gpus))}): merge one GPU's")
    rows, seen = [], set()
    for result in results:
        for row in result["rows"]:
            key = (row["part"], row["config"], row.get("context"))
            if key not in seen:
                seen.add(key)
                rows.append(row)
    meta = {**results[0]["meta"], "command": [r["meta"]["command"] for r in results]}
    return {"meta": meta, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="bench.sh's RESULTS_DIRs (each holds results/throughput.json, logs/)")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    roots, docs = [pathlib.Path(r) for r in args.results], pathlib.Path(args.docs)
    new = merge([json.loads(path.read_text()) for r in roots if (path := r / "results" / "throughput.json").exists()])
    current = docs / "results" / "throughput.json"
    old = json.loads(current.read_text())
    history = docs / "results" / "throughput_h100.json"
    if "H100" in old["meta"]["gpu"] and not history.exists():
        shutil.copy(current, history)
    if history.exists():
        h100 = json.loads(history.read_text())
        text = report(h100["rows"], h100["meta"]["gpu"]).replace("## Engine throughput (", "## History: engine throughput (", 1)
        write_section(docs / "benchmarks.md", "throughput-h100", text + "\n\nRows: `docs/results/throughput_h100.json`.")
    current.write_text(json.dumps(new, indent=1))
    write_section(docs / "benchmarks.md", "throughput", report(new["rows"], new["meta"]["gpu"]))
    dest = docs / "results" / "engine_h200"
    dest.mkdir(parents=True, exist_ok=True)
    for root in roots:
        for path in [*root.glob("profile_decode*"), *root.glob("profile_prefill*"), *root.glob("attention_sweep.*")]:
            shutil.copy(path, dest / path.name)
    print((docs / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
