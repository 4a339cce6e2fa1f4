"""`dmc study` end to end on a tiny random model (CPU): DMC at two CRs, plain continued training, GQA
(and its skip), H2O, TOVA and SnapKV at nominal and matched budgets; the files it writes, skipping finished
runs, --only / --report-only / resuming, continuing from the directory alone, and bad input."""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import pytest

from dmc.baselines import budget_for
from dmc.cli.main import main as cli
from dmc.study import StudySettings, parse_assignments, plan_runs, select_runs
from dmc.study.settings import StudyError
from dmc.tiny import write_tiny_model_dir

WORDS = ("the cache grows with every token and each step reads all of it so heads merge keys into slots while "
         "values follow the same weights").split()
WINDOW = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training and held-out documents of a tiny vocabulary, and a 1-layer Llama (4 heads, 2 KV heads)."""
    root = tmp_path_factory.mktemp("study-files")
    rng = random.Random(0)
    for split, n in (("train", 30), ("heldout", 6)):
        (root / split).mkdir()
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(40, 120))]
            (root / split / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    texts = [p.read_text() for p in sorted((root / "train").iterdir())]
    write_tiny_model_dir(root / "model", texts, vocab_size=200, hidden=32, layers=1, heads=4, kv_heads=2,
                         max_positions=128)
    return root


def _args(files: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
    return ["study", str(files / "model"), "--data", str(files / "train"), "--heldout", str(files / "heldout"),
            "--out", str(out), *extra,
            "--set", "zero_out_steps=1", "retrofit_steps=1", "finetune_steps=2", "seq_len=16", "micro_batch_size=2",
            "lr=1e-3", "eval_every=100", "tensorboard=false", "progress=false", f"token_cache={files / 'tokens'}",
            "--eval-seq-len", str(WINDOW), "--eval-windows", "2", "--eval-batch-size", "2"]


@pytest.fixture(scope="module")
def study(files):
    out = files / "study"
    status = cli(_args(files, out, "--crs", "2", "4"))
    return out, status


def _rows(out: pathlib.Path) -> dict:
    result = json.loads((out / "results.json").read_text())
    return result, {(r["run"], r.get("budget_kind")): r for r in result["rows"]}


def test_the_study_writes_every_row_and_the_meta(study, files):
    out, status = study
    assert status == 0
    result, rows = _rows(out)
    evictions = {(f"{m}@{cr}", kind) for m in ("h2o", "tova", "snapkv") for cr in (2, 4)
                 for kind in ("nominal", "matched")}
    assert set(rows) == {("original", None), ("plain", None), ("dmc@2", None), ("dmc@4", None), ("gqa@2", None)} \
        | evictions
    assert [(s["run"], s["status"]) for s in result["skipped"]] == [("gqa@4", "skipped")]
    assert "2 KV heads do not split into groups of 4" in result["skipped"][0]["reason"]
    assert result["pending"] == []
    for row in rows.values():
        for key in ("method", "target_cr", "realized_cr", "perplexity", "loss", "tokens", "train_seconds",
                    "ratio_to_plain", "ratio_to_original", "eval_windows"):
            assert key in row, (row["run"], key)
        assert row["perplexity"] > 1 and row["eval_windows"] == 2
    # every training run got the same tokens: 4 steps of 2 rows of 16
    trained = [rows[(n, None)] for n in ("plain", "dmc@2", "dmc@4", "gqa@2")]
    assert {r["tokens"] for r in trained} == {4 * 2 * 16}
    assert all(r["train_seconds"] > 0 and r["train"]["steps"] == 4 for r in trained)
    for cr in (2, 4):
        dmc = rows[(f"dmc@{cr}", None)]
        assert dmc["realized_cr"] >= 1 and "relaxed_gap" in dmc and dmc["loss_relaxed"] > 0
        assert dmc["relaxed_gap"] == pytest.approx(dmc["loss"] - dmc["loss_relaxed"])
        assert len(dmc["compression"]["per_head_cr"]) == 1  # one layer
        for method in ("h2o", "tova", "snapkv"):
            nominal, matched = rows[(f"{method}@{cr}", "nominal")], rows[(f"{method}@{cr}", "matched")]
            assert nominal["budget"] == budget_for(WINDOW, cr) and nominal["realized_cr"] == pytest.approx(cr)
            assert matched["budget"] == budget_for(WINDOW, dmc["realized_cr"])
            assert matched["budget_cr"] == pytest.approx(dmc["realized_cr"]) and matched["evicts_on"] == "original"
            assert matched["realized_cr"] == pytest.approx(WINDOW / matched["budget"])
    assert rows[("gqa@2", None)]["realized_cr"] == 2 and rows[("gqa@2", None)]["kv_heads"] == 1
    assert rows[("plain", None)]["ratio_to_plain"] == 1 and rows[("original", None)]["ratio_to_original"] == 1
    meta = result["meta"]
    assert meta["device"] and meta["model"]["kv_heads"] == 2 and meta["data"] == [str(files / "train")]
    assert meta["heldout"]["files"] == 6 and meta["evaluation"]["window_tokens"] == WINDOW
    assert meta["commands"][0].startswith("dmc study ") and "--crs 2 4" in meta["commands"][0]
    assert meta["settings"]["train"]["retrofit_steps"] == 1 and "progress" not in meta["settings"]["train"]
    markdown = (out / "results.md").read_text()
    for text in ("| run | model | target CR", "| dmc@4 | DMC |", "vs plain", "Skipped or failed:", "gqa@4",
                 "perplexity_vs_cr.png"):
        assert text in markdown
    assert (out / "perplexity_vs_cr.png").stat().st_size > 1000 and (out / "heads_dmc-4x.png").exists()


def test_a_second_invocation_skips_finished_runs(study, files, capsys):
    out, _ = study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    capsys.readouterr()
    assert cli(_args(files, out, "--crs", "2", "4")) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 12 and "training" not in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")} == before


def test_only_report_only_resume_and_continue(files, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["--crs", "2", "--methods", "dmc", "h2o"]
    # H2O before DMC: the nominal budget now, the matched one later
    assert cli(_args(files, out, *base, "--only", "h2o@2")) == 0
    h2o = json.loads((out / "runs" / "h2o-2x" / "result.json").read_text())
    assert h2o["status"] == "partial" and [r["budget_kind"] for r in h2o["rows"]] == ["nominal"]
    # DMC stopped early by max_steps, then resumed from its checkpoint
    assert cli(_args(files, out, *base, "--only", "dmc@2", "--set", "max_steps=2")) == 0
    assert not (out / "runs" / "dmc-2x" / "result.json").exists()
    capsys.readouterr()
    assert cli(_args(files, out, *base, "--only", "dmc@2")) == 0
    assert "resuming" in capsys.readouterr().out
    assert cli(["study", "--out", str(out), "--report-only"]) == 0
    result, rows = _rows(out)
    assert set(rows) == {("dmc@2", None), ("h2o@2", "nominal")}
    assert {p["run"] for p in result["pending"]} == {"original", "h2o@2"}
    # continue from the directory alone: the saved settings
    assert cli(["study", "--out", str(out), "--only", "h2o@2"]) == 0
    result, rows = _rows(out)
    assert rows[("h2o@2", "matched")]["budget"] == budget_for(WINDOW, rows[("dmc@2", None)]["realized_cr"])
    assert {p["run"] for p in result["pending"]} == {"original"}
    assert len(result["meta"]["commands"]) == 4  # --report-only runs nothing and is not recorded


def test_a_diverged_training_is_reported_and_the_study_goes_on(files, tmp_path, monkeypatch, capsys):
    from dmc.study.runner import Study
    from dmc.train.trainer import TrainingDiverged

    def diverge(self, run, method, source):
        raise TrainingDiverged("the loss was not finite at steps 3, 4\n(details)")

    monkeypatch.setattr(Study, "_train", diverge)
    out = tmp_path / "s"
    assert cli(_args(files, out, "--crs", "2", "--methods", "dmc", "h2o", "--only", "dmc", "h2o")) == 0
    result, rows = _rows(out)
    assert result["skipped"] == [{"run": "dmc@2", "status": "failed",
                                  "reason": "training diverged: the loss was not finite at steps 3, 4"}]
    assert set(rows) == {("h2o@2", "nominal")}  # no matched budget without a DMC row, nothing pending for it
    assert [p["run"] for p in result["pending"]] == ["original"]
    capsys.readouterr()
    assert cli(_args(files, out, "--crs", "2", "--methods", "dmc", "h2o", "--only", "dmc")) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_plain_runs_per_cr_when_the_plans_differ_and_only_picks_runs(files):
    s = StudySettings(model=str(files / "model"), data=["d"], heldout=["h"], out="o", crs=[4, 2],
                      train={"steps_per_cr": 10})
    runs = plan_runs(s)
    assert [r.name for r in runs] == ["original", "dmc@2", "dmc@4", "plain@2", "plain@4", "gqa@2", "gqa@4",
                                      "h2o@2", "h2o@4", "tova@2", "tova@4", "snapkv@2", "snapkv@4"]
    assert [r.dirname for r in select_runs(runs, ["plain@4", "tova"])] == ["plain-4x", "tova-2x", "tova-4x"]
    shared = plan_runs(StudySettings(model="m", data=["d"], heldout=["h"], out="o", crs=[2, 4],
                                     train={"retrofit_steps": 10}))
    assert [r.name for r in select_runs(shared, ["plain@4"])] == ["plain"]
    with pytest.raises(StudyError, match="no such run"):
        select_runs(runs, ["gqa@3"])
    assert parse_assignments(["lr=3e-4", "stages=zero-out,retrofit", "bf16=false", "retrofit_steps=none",
                              "finetune_steps=100"]) == {"lr": 3e-4, "stages": ["zero-out", "retrofit"],
                                                         "bf16": False, "retrofit_steps": None, "finetune_steps": 100}


@pytest.mark.parametrize("case", ["same-dirs", "inside", "same-content", "unknown-key", "bad-value", "per-run-key",
                                  "cr", "model", "only", "report-empty", "other-settings", "no-heldout", "recipe"])
def test_bad_input_fails_with_one_line(case, files, study, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args(files, out, "--crs", "2")
    if case == "same-dirs":
        args[args.index("--heldout") + 1] = str(files / "train")
        expect = "also training data"
    elif case == "inside":
        args[args.index("--heldout") + 1] = str(files / "train" / "doc03.txt")
        expect = "also training data"
    elif case == "same-content":
        shutil.copy(files / "train" / "doc05.txt", tmp_path / "copy.txt")
        args[args.index("--heldout") + 1] = str(tmp_path / "copy.txt")
        expect = "same content"
    elif case == "unknown-key":
        args += ["--set", "learning_rate=1"]
        expect = "unknown training setting 'learning_rate'"
    elif case == "bad-value":
        args += ["--set", "lr=fast"]
        expect = "not a valid float"
    elif case == "per-run-key":
        args += ["--set", "target_cr=3"]
        expect = "set by the study"
    elif case == "cr":
        args[args.index("--crs") + 1] = "1"
        expect = "must be > 1"
    elif case == "model":
        args[1] = str(tmp_path / "missing")
        expect = "not a Hugging Face model directory"
    elif case == "only":
        args += ["--only", "gqa@3"]
        expect = "no such run"
    elif case == "report-empty":
        args = ["study", "--out", str(out), "--report-only"]
        expect = "holds no study"
    elif case == "other-settings":
        args = _args(files, study[0], "--crs", "2", "4") + ["--set", "lr=5e-3"]
        expect = "other settings (train, train.lr)"
    elif case == "no-heldout":
        i = args.index("--heldout")
        del args[i:i + 2]
        expect = "--heldout is required"
    else:
        (tmp_path / "r.yaml").write_text("lr: 1e-3\nwindow_size: 4\n")
        args += ["--recipe", str(tmp_path / "r.yaml")]
        expect = "unknown training setting 'window_size'"
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err and "Traceback" not in err
    assert not (out / "runs").exists()
