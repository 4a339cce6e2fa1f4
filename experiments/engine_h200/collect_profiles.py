"""Fold stop 21's H200 runs that experiments/engine_h200/collect.py does not handle into the docs:

- the decode profile *before* the per-row changes (call 1; ``benchmarks/profile_decode.py`` was stopped by its
  260 s limit during its 4th config, CR 4 + fp8, before it wrote its JSON; the three rows it printed are
  rendered by the script's own report, :func:`profile_decode.report_from_log`);
- the prefill profile (``profile_prefill_*``) and the full tile sweep of call 1 (``attention_sweep.*``);
- the final call's sweep of the fp8 read dtype, as ``attention_sweep_fp8_read.*``.

    python experiments/engine_h200/collect_profiles.py CALL1_DIR FINAL_DIR [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "benchmarks"))
from profile_decode import report_from_log  # noqa: E402

BEFORE_NOTE = ("Stopped by its 260 s limit (the device call's budget) during the fourth config, CR 4 + fp8 at batch 397, "
               "before it wrote its JSON: the three rows it had printed, rendered by `profile_decode.report_from_log`. "
               "Code: the decode step of ffcb895 (this profile's run also carried the prefill changes of 669bb46, "
               "which do not touch the decode step).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("call1", help="call 1's RESULTS dir (profile.log, profile_prefill_*, attention_sweep.*)")
    parser.add_argument("final", help="the final call's RESULTS dir (its attention_sweep.* is the fp8 read sweep)")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    call1, final = pathlib.Path(args.call1), pathlib.Path(args.final)
    dest = pathlib.Path(args.docs) / "throughput_runs" / "h200_engine"
    dest.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/profile_decode.py --out /root/keep/tp --label before "
               "--configs 1:51 4:201 8:390 4:397:fp8")
    gpu = (call1 / "gpu.txt").read_text().splitlines()[1].split(",")[0].strip()
    meta = {"gpu": gpu, "torch": "2.11.0+cu130", "label": "before", "command": command, "note": BEFORE_NOTE}
    report_from_log(str(call1 / "profile.log"), str(dest), meta)
    for path in [*call1.glob("profile_prefill_*"), *call1.glob("attention_sweep.*")]:
        shutil.copy(path, dest / path.name)
    for suffix in ("json", "md"):
        shutil.copy(final / f"attention_sweep.{suffix}", dest / f"attention_sweep_fp8_read.{suffix}")
    print(json.dumps(sorted(p.name for p in dest.iterdir())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
