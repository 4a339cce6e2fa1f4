"""Render pool_sweep.sh's runs into one report (issue #15): the rows are the JSON lines attention_sweep.py prints,
read from the logs the device call brought back (the runs' own attention_sweep.md files did not come back).

    python experiments/engine_h200/collect_pool_sweep.py LOG_DIR OUT.md
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import attention_sweep  # noqa: E402

# The logs' rows do not name the GPU; the device call that ran pool_sweep.sh was on one NVIDIA H200.
GPU = "NVIDIA H200"
RUNS = (("small", ""), ("big", "--pool-gib 100"), ("bigrun", "--pool-gib 100 --contiguous"))  # pool_sweep.sh's


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit("usage: collect_pool_sweep.py LOG_DIR OUT.md")
    logs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    parts = [f"# Paged decode attention by pool size and page placement ({GPU})", "",
             "Written from the logs in `pool_sweep/` of `bash experiments/engine_h200/pool_sweep.sh RESULTS` (code of "
             "the commit that adds this file, one device call; the per-run attention_sweep.md files did not come back, "
             "their rows are the JSON lines of these logs, rendered by attention_sweep.report through "
             "`experiments/engine_h200/collect_pool_sweep.py`). The CR 8 and CR 1 shapes of the 2K-context decode "
             "profile (bf16, dots) and the CR 4 + fp8 shape (deferred sums): the pool the pages need, scattered "
             "(small); a 100 GiB pool with the pages scattered over all of it (big); a 100 GiB pool with each head's "
             "pages in one run (bigrun). Result: the same time within 3% in all three, so the pool's size and the page "
             "placement do not explain the engine's slower CR 8 attention.", ""]
    for name, opts in RUNS:
        rows = []
        for log in (f"{name}.log", f"{name}-fp8.log"):
            path = logs / log
            if not path.exists():
                sys.exit(f"collect_pool_sweep.py: {path} is missing (pool_sweep.sh writes it)")
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        meta = {"gpu": GPU, "heads": 32, "command": f"python benchmarks/attention_sweep.py ... {opts}".strip()}
        parts += [f"## {name} ({opts or 'the pages used only'})", "", attention_sweep.report(rows, meta).split("\n", 2)[2]]
    out.write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
