"""Record a gpu_serving.sh run in the repository: its rows into docs/results/serving.json (and the Serving table of
docs/benchmarks.md, re-rendered from it), and the profiles of its servers into docs/results/serving_profile.json
and .md: the engine's milliseconds per step by section (``dmc serve --profile-steps``) and, from py-spy's samples of
the DMC server's processes, the engine process's lines that held the most samples.

    python experiments/serve/collect.py KEEP [--exclude-model TEXT ...] [--exclude-run LABEL ...]

KEEP is the folder the run wrote (unpacked from monitor.sh's serving.tgz). ``--exclude-model`` leaves out rows whose
model name holds TEXT (a run known to be mislabelled; say why in the report's prose).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_load  # noqa: E402

RESULTS = ROOT / "docs" / "results"


def engine_lines(path: pathlib.Path, top: int = 12) -> dict:
    """py-spy's raw (collapsed) samples: the engine process's share of all samples, and the dmc lines holding the
    most of its samples (inclusive)."""
    total, engine, lines = 0, 0, collections.Counter()
    for row in path.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        total += count
        if "multiprocessing/spawn" not in stack:  # the engine core's process is the spawned one
            continue
        engine += count
        for frame in dict.fromkeys(f for f in stack.split(";") if "dmc/" in f):
            lines[re.sub(r"^(\S+) \((.*)\)$", r"\2 \1", frame)] += count
    return {"samples": total, "engine_samples": engine,
            "engine_lines": [{"line": k, "share": round(v / max(engine, 1), 3)} for k, v in lines.most_common(top)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keep")
    parser.add_argument("--exclude-model", nargs="*", default=[])
    parser.add_argument("--exclude-run", nargs="*", default=[], help="profiles of these runs (labels) are left out")
    args = parser.parse_args()
    keep = pathlib.Path(args.keep)
    new = [r for r in serve_load.load_rows(keep / "results" / "serving.json")
           if not any(text in r["model"] for text in args.exclude_model)]
    rows = serve_load.upsert_rows(serve_load.load_rows(RESULTS / "serving.json"), new)
    serve_load.write_rows(RESULTS / "serving.json", rows)
    serve_load.write_serving_section(ROOT / "docs" / "benchmarks.md",
                                     serve_load.serving_table(rows, "docs/results/serving.json"))
    profiles = {}
    for f in sorted((keep / "profiles").glob("steps-*.json")):
        profiles[f.stem.removeprefix("steps-")] = {"steps": json.loads(f.read_text())}
    for f in sorted((keep / "profiles").glob("pyspy-*.txt")):
        profiles.setdefault(f.stem.removeprefix("pyspy-"), {})["py_spy"] = engine_lines(f)
    profiles = {name: p for name, p in profiles.items() if name not in args.exclude_run}
    gpu = next((r["gpu"] for r in new), "unknown")
    commit = next((r["commit"] for r in new if "server of" not in r["model"]), "unknown")
    (RESULTS / "serving_profile.json").write_text(json.dumps({"gpu": gpu, "commit": commit, "runs": profiles},
                                                             indent=1) + "\n")
    out = [f"# Where a served model's engine steps go ({gpu}, code at {commit})", "",
           "Written by `experiments/serve/collect.py` from [serving_profile.json](serving_profile.json): the runs of "
           "`experiments/serve/gpu_serving.sh` (the loads are rows of [serving.json](serving.json)). *ms per step*: "
           "`dmc serve --profile-steps` (wall time of the engine's steps by section; prefill and decode include "
           "the host's wait for the GPU). *py-spy*: samples of the server's processes at 25 Hz during the load; "
           "the share of the engine process's samples that each dmc line was on the stack of.", ""]
    sections = sorted({s for p in profiles.values() for s in p.get("steps", {}).get("engine", {}).get("ms_per_step", {})})
    if sections:
        out += ["| run | steps | " + " | ".join(sections) + " | total ms/step | server dispatch ms/message |",
                "|---|---|" + "---|" * len(sections) + "---|---|"]
        for name, p in profiles.items():
            if "steps" not in p:
                continue
            engine, server = p["steps"]["engine"], p["steps"]["server"]
            cells = [f"{engine['ms_per_step'].get(s, 0):.2f}" for s in sections]
            out.append(f"| {name} | {engine['steps']} | " + " | ".join(cells)
                       + f" | {engine['total_ms_per_step']:.2f} | {server['dispatch_ms_per_message']:.2f} |")
        out.append("")
    for name, p in profiles.items():
        if "py_spy" in p:
            spy = p["py_spy"]
            out += [f"py-spy, {name}: {spy['engine_samples']} of {spy['samples']} samples in the engine process", "",
                    "| share | line |", "|---|---|"]
            out += [f"| {x['share']:.0%} | `{x['line']}` |" for x in spy["engine_lines"]] + [""]
    (RESULTS / "serving_profile.md").write_text("\n".join(out))
    print(f"{len(new)} rows recorded; profiles of {', '.join(profiles) or 'none'}")


if __name__ == "__main__":
    main()
