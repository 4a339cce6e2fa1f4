"""``dmc study``: DMC against plain continued training, GQA up-training, H2O, TOVA and SnapKV on one
model.

Every training run (DMC at each CR, plain, GQA) is a :class:`dmc.train.Retrofitter` run with the
same TrainConfig settings (so the same data, sequence length, batch and steps: the same tokens);
H2O, TOVA and SnapKV evict on the untouched original at budgets matched to DMC's realized slots and at the
nominal CR; every model is evaluated on the same held-out windows with :mod:`dmc.eval`.

    from dmc.study import StudySettings, run_study
    run_study(StudySettings(model="m/", data=["train/"], heldout=["heldout/"], out="study/", crs=[2, 4],
                            train={"retrofit_steps": 600, "seq_len": 1024}))
"""

from __future__ import annotations

import pathlib

from .report import load_study, report_summary, write_report
from .runner import Study, log
from .settings import METHODS, Run, StudyError, StudySettings, load_recipe, parse_assignments, plan_runs, \
    select_runs


def run_study(s: StudySettings, only: list[str] | None = None, command: str = "dmc.study.run_study(...)") -> dict:
    """Run (or continue) the runs of ``s`` (those named by ``only``: ``METHOD`` or ``METHOD@CR``),
    then merge every result file of ``s.out`` into results.json/results.md; returns results.json's
    content. Raises StudyError for bad input."""
    s.validate()
    study = Study(s)
    runs = select_runs(plan_runs(s), only)
    study.register(command)
    log(f"study in {study.root}: {len(runs)} run(s): {', '.join(r.name for r in runs)}")
    try:
        study.execute(runs)
    finally:
        result = report(study.root)
    return result


def report(out: str | pathlib.Path) -> dict:
    """Merge whatever result files ``out`` holds into results.json, results.md and the plots."""
    root = pathlib.Path(out)
    result = write_report(root)
    log(f"report: {report_summary(result)} → {root / 'results.json'}, {root / 'results.md'}")
    return result


__all__ = ["METHODS", "Run", "Study", "StudyError", "StudySettings", "load_recipe", "load_study",
           "parse_assignments", "plan_runs", "report", "run_study", "select_runs"]
