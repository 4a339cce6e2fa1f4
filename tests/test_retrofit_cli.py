"""The retrofit CLI and its run directory: nothing lost, nothing silently wrong.

Every case drives the CLI (``dmc.cli.main.main``) the way a user would and checks the exact outcome:
the exit code, a one-line message that says what to do, no traceback, and the files that must
survive still there byte for byte. Runs that must be killed (SIGKILL, SIGINT, a second process on
the same --out) are forked from one helper process that imported torch once (a fresh Python
start costs ~10-20 s on a small machine): each fork is a fresh ``dmc retrofit`` process.

Set DMC_SLOW_TESTS=1 for more fault-injection seeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import stock_model

from dmc.cli.main import main as cli
from dmc.tiny import train_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("the cache grows with every token and each step reads all of it so heads merge keys into slots while "
         "values follow the same weights").split()
# A 7-step plan on 32-token rows: every run takes a few seconds.
PLAN = ["--target-cr", "2", "--stages", "zero-out", "retrofit", "finetune", "--zero-out-steps", "2",
        "--retrofit-steps", "3", "--finetune-steps", "2", "--seq-len", "32", "--micro-batch-size", "2",
        "--lr", "1e-3", "--save-every", "2", "--eval-every", "4", "--eval-batches", "1", "--no-tensorboard",
        "--no-progress"]
TOTAL_STEPS = 7


# ------------------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny runs are fastest on one thread (and several threads crawl on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    """A tiny Llama (tests/conftest.py) with a BPE tokenizer, 30 small text files, a token cache."""
    root = tmp_path_factory.mktemp("safety")
    rng = random.Random(0)
    texts = []
    (root / "data").mkdir()
    for i in range(30):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90))) + ".\n"
        (root / "data" / f"doc{i:02d}.txt").write_text(text)
        texts.append(text)
    tokenizer = train_tokenizer(texts, 300)
    stock_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "tokens").mkdir()
    return root


def _argv(work: pathlib.Path, out, *extra: str, model=None, plan=PLAN) -> list[str]:
    return ["retrofit", str(model or work / "model"), "--data", str(work / "data"), "--out", str(out),
            "--token-cache", str(work / "tokens"), *plan, *extra]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``dmc ARGV`` run in this process; any exception escaping the
    CLI fails the test (that would be a traceback for the user)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, stdout.getvalue(), stderr.getvalue()


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(code: int, stderr: str, *needles: str, expected_code: int = 2) -> str:
    assert code == expected_code, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = errors(stderr)
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (directories as None)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def finite_checkpoint(path: pathlib.Path) -> bool:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    state = torch.load(target, weights_only=False)
    target.unlink()
    tensors = [t for t in _leaves(state) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def model_tensors(out: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def finished(work, tmp_path_factory) -> tuple[pathlib.Path, str, str]:
    """A finished run of the plan: (out, stdout, stderr). Tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    code, stdout, stderr = run_cli(_argv(work, out))
    assert code == 0, stderr[-3000:]
    return out, stdout, stderr


def copy_run(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------------ --overwrite deletes only a run of ours
def test_out_equal_to_the_input_model_is_refused_and_the_model_survives(work):
    before = snapshot(work / "model")
    for extra in ((), ("--overwrite",)):
        code, _, stderr = run_cli(_argv(work, work / "model", *extra))
        line = assert_one_line_error(code, stderr, "is the input model", "choose another --out")
        assert "--overwrite" not in line  # never advise deleting the input model
    assert snapshot(work / "model") == before


@pytest.mark.parametrize("where", ["data dir", "inside data", "holds data", "inside model", "holds model"])
def test_out_overlapping_model_or_data_is_refused(work, tmp_path, where):
    # a copy of model and data inside tmp_path, so that a directory holding them can be named too
    model = shutil.copytree(work / "model", tmp_path / "m" / "model")
    data = shutil.copytree(work / "data", tmp_path / "d" / "data")
    out = {"data dir": data, "inside data": data / "run", "holds data": tmp_path / "d",
           "inside model": model / "dmc", "holds model": tmp_path / "m"}[where]
    before = snapshot(tmp_path)
    code, _, stderr = run_cli(["retrofit", str(model), "--data", str(data), "--out", str(out), "--overwrite",
                               "--token-cache", str(work / "tokens"), *PLAN])
    kind = "the input model" if "model" in where else "the training data"
    verb = {"data dir": "is", "inside data": "is inside", "holds data": "holds", "inside model": "is inside",
            "holds model": "holds"}[where]
    assert_one_line_error(code, stderr, f"{verb} {kind}")
    assert snapshot(tmp_path) == before  # nothing created, nothing removed


def test_out_dot_home_and_root_are_refused(work, tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    for d in (home, cwd):
        d.mkdir()
        (d / "notes.txt").write_text("the user's own file\n")
        shutil.copytree(work / "data", d / "data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    for out, needle in ((".", "is the current directory"), ("~", "is your home directory"),
                        ("/", "is the root of the file system"), ("..", "is a directory holding")):
        code, _, stderr = run_cli(_argv(work, out, "--overwrite"))
        assert_one_line_error(code, stderr, f"--out {out} {needle}")
    assert snapshot(tmp_path) == before


def test_overwrite_removes_only_our_files(work, finished, tmp_path):
    out = copy_run(finished[0], tmp_path / "out")
    (out / "notes.txt").write_text("mine\n")
    (out / "eval").mkdir()
    (out / "eval" / "report.json").write_text("{}\n")
    foreign = {k: v for k, v in snapshot(out).items() if k.startswith(("notes", "eval"))}
    old_weights = (out / "model.safetensors").read_bytes()
    code, stdout, stderr = run_cli(_argv(work, out, "--overwrite", "--seed", "1"))
    assert code == 0, stderr[-3000:]
    after = snapshot(out)
    assert {k: after[k] for k in foreign} == foreign  # the user's files, byte for byte
    assert (out / "model.safetensors").read_bytes() != old_weights  # a new run (another seed) replaced ours
    assert json.loads((out / "run" / "run.json").read_text())["seed"] == 1
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # the old run's metrics are gone


def test_overwrite_refuses_a_directory_that_is_not_a_run_of_ours(work, tmp_path):
    out = shutil.copytree(work / "model", tmp_path / "someones-model")  # a model, but no run/run.json
    (out / "README.md").write_text("my fine-tune\n")
    before = snapshot(out)
    code, _, stderr = run_cli(_argv(work, out, "--overwrite"))
    assert_one_line_error(code, stderr, "holds a model that no dmc run wrote", "choose an empty or new --out",
                          "--overwrite only replaces a dmc run")
    assert snapshot(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("x")
    code, _, stderr = run_cli(_argv(work, tmp_path / "other", "--overwrite"))
    assert_one_line_error(code, stderr, "exists and is not a dmc run directory")
    assert (tmp_path / "other" / "a.txt").read_text() == "x" and len(list((tmp_path / "other").iterdir())) == 1


def test_finished_run_message_suggests_overwrite(work, finished, tmp_path):
    out = copy_run(finished[0], tmp_path / "out")
    before = snapshot(out)
    code, _, stderr = run_cli(_argv(work, out))
    assert_one_line_error(code, stderr, "already holds the finished model of this run", "--overwrite")
    assert snapshot(out) == before


def test_resume_of_a_finished_run_says_so_and_writes_nothing(work, finished, tmp_path):
    out = copy_run(finished[0], tmp_path / "out")
    before = snapshot(out)
    code, stdout, stderr = run_cli(_argv(work, out, "--resume"))
    assert code == 0, stderr[-3000:]
    assert stdout.splitlines() == [f"{out} already holds the finished model of this run ({TOTAL_STEPS} steps); "
                                   "nothing to resume (--overwrite trains it again)"]
    assert "Traceback" not in stderr and "warning" not in stderr.lower(), stderr[-3000:]
    assert snapshot(out) == before  # the model is not written again, the checkpoint and metrics are untouched


def test_finished_run_keeps_only_its_last_checkpoint_unless_all_are_asked_for(work, finished, tmp_path):
    _, stdout, _ = finished
    out = finished[0]
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["latest", "step_00000007"]
    assert (out / "run" / "checkpoints" / "latest").read_text() == "step_00000007"
    kept = [line for line in stdout.splitlines() if line.startswith("checkpoints:")]
    assert kept == ["checkpoints: kept the last one, run/checkpoints/step_00000007, removed 1 older "
                    "(--keep-checkpoints all keeps every one)"]
    code, stdout, stderr = run_cli(_argv(work, tmp_path / "all", "--keep-checkpoints", "all"))
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "all" / "run" / "checkpoints").iterdir()) == [
        "latest", "step_00000002", "step_00000004", "step_00000005", "step_00000006", "step_00000007"]
    assert not [line for line in stdout.splitlines() if line.startswith("checkpoints:")]
    assert (tmp_path / "all" / "config.json").exists()


# ------------------------------------------------------------------------------ --resume --overwrite
def test_resume_with_overwrite_is_refused_before_touching_anything(work, finished, tmp_path):
    out = copy_run(finished[0], tmp_path / "out")
    before = snapshot(out)
    code, _, stderr = run_cli(_argv(work, out, "--resume", "--overwrite"))
    assert_one_line_error(code, stderr, "--resume and --overwrite contradict each other", "pass only one")
    config = tmp_path / "run.yaml"
    config.write_text("overwrite: true\n")  # easy to leave in a config file
    code, _, stderr = run_cli(_argv(work, out, "--resume", "--config", str(config)))
    assert_one_line_error(code, stderr, "--resume and --overwrite contradict each other")
    assert snapshot(out) == before


# ------------------------------------------------------------------------------ a failed start leaves nothing
def test_failed_start_leaves_no_run_behind(work, tmp_path):
    out = tmp_path / "runs" / "new"
    code, _, stderr = run_cli(_argv(work, out, "--data", str(tmp_path / "missing")))
    assert_one_line_error(code, stderr, "does not exist")
    assert not (tmp_path / "runs").exists()  # no run.json, no lock, no directories it created
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli(_argv(work, tmp_path / "empty", "--text-field", "body", "--data",
                                    str(tmp_path / "missing.jsonl")))
    assert code == 2 and list((tmp_path / "empty").iterdir()) == []  # an existing directory stays, empty
    # the corrected command is neither "a different run" nor "nothing to resume"
    code, stdout, stderr = run_cli(_argv(work, out, "--max-steps", "1"))
    assert code == 0, stderr[-3000:]
    assert "stopped at step 1/7; continue with --resume" in stdout


def test_overwrite_that_fails_to_start_keeps_the_previous_run(work, finished, tmp_path):
    out = copy_run(finished[0], tmp_path / "out")
    before = snapshot(out)
    code, _, stderr = run_cli(_argv(work, out, "--overwrite", "--data", str(tmp_path / "typo")))
    assert_one_line_error(code, stderr, "does not exist")
    assert snapshot(out) == before  # the old run is removed only once the new one has loaded


# ------------------------------------------------------------------------------ a diverging run stops
def test_non_finite_loss_stops_without_a_model_and_keeps_the_last_good_checkpoint(work, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(_argv(work, out, "--lr", "1e9", "--save-every", "1"))
    line = assert_one_line_error(code, stderr, "training diverged: non-finite loss", "at step 2;",
                                 "stopped without writing a model", "the last good checkpoint, step_00000001",
                                 "lower --lr", expected_code=1)
    assert "lm_loss=nan" in line
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    checkpoints = out / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]  # no NaN checkpoint
    assert finite_checkpoint(checkpoints / "step_00000001")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[1]["lm_loss"] is None  # NaN as JSON null


def test_nan_patience_tolerates_that_many_more_steps(work, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_cli(_argv(work, out, "--lr", "1e9", "--save-every", "1", "--nan-patience", "2"))
    assert_one_line_error(code, stderr, "at step 2 and 2 more step(s)", "step_00000001", expected_code=1)
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["latest", "step_00000001"]


# ------------------------------------------------------------------------------ one-line errors instead of tracebacks
@pytest.mark.parametrize("flags, needle", [
    (["--eval-every", "0"], "eval_every must be >= 1"),
    (["--save-every", "0"], "save_every must be >= 1"),
    (["--attn-implementation", "foo"], "attn_implementation must be one of auto, flex, dense"),
    (["--window", "0"], "window must be a positive integer"),
    (["--merge-delay", "-1"], "merge_delay must be an integer >= 0"),
    (["--merge-delay", "100000"], "merge_delay 100000 keeps more raw tokens than CR"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--zero-out-steps", "-5"], "zero_out_steps must be >= 0"),
    (["--finetune-steps", "-1"], "finetune_steps must be >= 0"),
    (["--retrofit-steps", "-3"], "retrofit_steps must be >= 0"),
    (["--warmup-steps", "-1"], "warmup_steps must be >= 0"),
    (["--max-steps", "0"], "max_steps must be >= 1"),
    (["--target-cr", "-2"], "target CR must be >= 1"),
    (["--target-cr", "inf"], "target_cr must be a finite number"),
    (["--beta2", "1.5"], "beta2 must be in [0, 1)"),
    (["--grad-clip", "0"], "grad_clip must be > 0"),
    (["--keep-checkpoints", "-1"], "keep_checkpoints must be >= 0"),
    (["--keep-checkpoints", "some"], 'keep_checkpoints must be >= 0 or "all", got \'some\''),
    (["--nan-patience", "-1"], "nan_patience must be >= 0"),
    (["--zero-out-steps", "0", "--retrofit-steps", "0", "--finetune-steps", "0"], "the plan has no steps"),
])
def test_nonsense_settings_are_one_line_errors(work, tmp_path, flags, needle):
    code, _, stderr = run_cli(_argv(work, tmp_path / "out", *flags))
    assert_one_line_error(code, stderr, needle)
    assert not (tmp_path / "out").exists()


def test_broken_or_mistyped_config_files(work, tmp_path):
    cases = {
        "broken.yaml": ("lr: [1e-3\nseed: 1\n", "is not valid YAML at line"),
        "broken.json": ('{"lr": 1e-3,', "is not valid JSON at line 1"),
        "type.yaml": ("lr: fast\n", "lr in"),
        "int.yaml": ("seq_len: 3.5\n", "seq_len in"),
        "list.yaml": ("- lr: 1\n", "must hold a mapping of settings"),
        "unknown.yaml": ("learning_rate: 1\n", "unknown setting(s) ['learning_rate']"),
        "stages.yaml": ("stages: 5\n", "stages in"),
    }
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        code, _, stderr = run_cli(_argv(work, tmp_path / "out", "--config", str(tmp_path / name)))
        assert_one_line_error(code, stderr, needle)
    assert not (tmp_path / "out").exists()
    # YAML reads 3e-5 as a string: it is a number here
    (tmp_path / "ok.yaml").write_text("lr: 3e-5\nwindow: none\n")
    code, _, stderr = run_cli(_argv(work, tmp_path / "out", "--config", str(tmp_path / "ok.yaml"), "--max-steps", "1"))
    assert code == 0, stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "run" / "run.json").read_text())
    assert saved["lr"] == 1e-3 and saved["window"] is None  # the flag (PLAN's --lr) wins; the file's none counts


def test_broken_model_directories(work, tmp_path):
    truncated = shutil.copytree(work / "model", tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    corrupt = shutil.copytree(work / "model", tmp_path / "corrupt")
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    for model, needle in ((truncated, "a weight file may be truncated or corrupt"),
                          (corrupt, "cannot read")):
        code, _, stderr = run_cli(_argv(work, tmp_path / "out", model=model))
        assert_one_line_error(code, stderr, needle, "copy the model directory again")
        assert not (tmp_path / "out").exists()
        code, _, stderr = run_cli(["gqa", str(model), "--ratio", "2", "--out", str(tmp_path / "gqa")])
        assert_one_line_error(code, stderr, needle, "copy the model directory again")
        assert not (tmp_path / "gqa").exists()


def test_out_that_is_a_file_or_cannot_be_written(work, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("keep me\n")
    code, _, stderr = run_cli(_argv(work, tmp_path / "file"))
    assert_one_line_error(code, stderr, "is a file; pass a directory")
    code, _, stderr = run_cli(["gqa", str(work / "model"), "--ratio", "2", "--out", str(tmp_path / "file")])
    assert_one_line_error(code, stderr, "is a file")
    assert (tmp_path / "file").read_text() == "keep me\n"
    # a read-only place (simulated: this test may run as root, for whom chmod does not stop writes)
    readonly = tmp_path / "readonly"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(readonly)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    code, _, stderr = run_cli(_argv(work, readonly / "out"))
    assert_one_line_error(code, stderr, f"cannot write into --out {readonly / 'out'} (Permission denied)",
                          "choose a directory you can write to")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out(work, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        code, _, stderr = run_cli(_argv(work, tmp_path / "ro" / "out"))
        assert_one_line_error(code, stderr, "cannot write into --out")
        code, _, stderr = run_cli(_argv(work, tmp_path / "ro"))
        assert_one_line_error(code, stderr, "cannot write into --out")
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_sigint_while_a_checkpoint_is_written_exits_130_with_the_checkpoint_complete(work, tmp_path, monkeypatch):
    import dmc.train.checkpoint as checkpoint
    real_save = checkpoint.dcp.save
    calls = []

    def interrupted_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint (step 4), in the middle of writing it
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint.dcp, "save", interrupted_save)
    out = tmp_path / "out"
    code, _, stderr = run_cli(_argv(work, out))
    assert code == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupt received: finishing checkpoint step 4 first" in stderr
    assert "interrupted at step 4/7; the last checkpoint is step_00000004: continue with --resume" in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    checkpoints = out / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    code, stdout, stderr = run_cli(_argv(work, out, "--resume"))
    assert code == 0, stderr[-3000:]
    assert "resuming from step_00000004 (step 4/7)" in stdout


def test_resume_falls_back_when_the_latest_checkpoint_is_truncated(work, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_cli(_argv(work, out, "--max-steps", "4"))
    assert code == 0, stderr[-3000:]
    newest = out / "run" / "checkpoints" / "step_00000004"
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    code, stdout, stderr = run_cli(_argv(work, out, "--resume"))
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    warning = [line for line in stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and "step_00000004 cannot be read" in warning[0]
    assert "resuming from the one before it, step_00000002" in warning[0]
    assert "resuming from step_00000002 (step 2/7)" in stdout
    assert (out / "config.json").exists()
    # set aside while it mattered, removed once the run wrote step 4 again
    assert "set aside as step_00000004.unreadable" in warning[0]
    # (and once the run is finished only its last checkpoint stays)
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == ["latest", "step_00000007"]


# ------------------------------------------------------------------------------ help, plan, final CR
def test_every_retrofit_flag_has_help_with_its_default():
    from dmc.cli.main import build_parser
    parser = build_parser()
    retrofit = next(a for a in parser._actions if a.dest == "command").choices["retrofit"]
    missing = []
    for action in retrofit._actions:
        if action.dest in ("help", "config", "model"):
            continue
        if not action.help or "default" not in action.help or action.help.startswith("(default"):
            missing.append(action.option_strings[0])  # a description, then the default
    assert not missing, f"flags without help or default (add them to dmc/cli/retrofit.py _HELP): {missing}"
    text = " ".join(retrofit.format_help().split())
    temperature = next(a for a in retrofit._actions if a.dest == "temperature").help
    assert "Gumbel-sigmoid" in temperature and "not a sampling temperature" in temperature
    assert "(default: 0.1)" in temperature
    assert "(default: 200)" in text and "over 80% of it" in text and "%%" not in text  # rendered by argparse


def test_plan_summary_and_final_cr_warning(finished):
    _, stdout, _ = finished
    assert stdout.splitlines()[0] == (
        "plan: zero-out 2 + retrofit 3 + finetune 2 = 7 steps; global batch 2 rows (micro-batch 2 x grad-accum 1 "
        "x 1 process) of 32 tokens = 64 tokens/step; 448 tokens in all")
    # seven steps are far too few to reach CR 2: the run says so at the end
    warning = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "from the target 2" in warning[0]


# ------------------------------------------------------------------------------ processes: a fork server
# One helper process imports torch, transformers and dmc once, then forks a fresh `dmc retrofit`
# process per request (it never runs a torch op itself, so its forks start clean). A fork can be
# told to signal itself at the n-th event of a kind ("checkpoint": a call inside
# Checkpointer.save: dcp.save, os.replace, shutil.rmtree; "step": gradient clipping and the
# optimizer step inside a training step), before the call runs.
SERVER = r'''
import json, os, signal, sys, types
import torch, transformers
import dmc, dmc.cli.main, dmc.cli.retrofit, dmc.train.trainer, dmc.train.checkpoint as ck
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # import the lazy modules now
torch.set_num_threads(1)


def install(fault):
    counts = {"checkpoint": 0, "step": 0}

    def event(kind):
        counts[kind] += 1
        if fault and fault["kind"] == kind and counts[kind] == fault["at"]:
            os.kill(os.getpid(), getattr(signal, fault["signal"]))

    def wrap(kind, fn):
        def wrapped(*args, **kwargs):
            event(kind)
            return fn(*args, **kwargs)
        return wrapped

    class Proxy(types.SimpleNamespace):
        def __init__(self, module, **overrides):
            super().__init__(**overrides)
            self._module = module

        def __getattr__(self, name):
            return getattr(self._module, name)

    ck.dcp = Proxy(ck.dcp, save=wrap("checkpoint", ck.dcp.save))
    ck.os = Proxy(ck.os, replace=wrap("checkpoint", ck.os.replace))
    ck.shutil = Proxy(ck.shutil, rmtree=wrap("checkpoint", ck.shutil.rmtree))
    torch.nn.utils.clip_grad_norm_ = wrap("step", torch.nn.utils.clip_grad_norm_)
    torch.optim.AdamW.step = wrap("step", torch.optim.AdamW.step)
    return counts


print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "start":
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                counts = install(request.get("fault"))
                code = dmc.cli.main.main(request["argv"])
                if request.get("counts"):
                    with open(request["counts"], "w") as f:
                        json.dump(counts, f)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class ForkServer:
    def __init__(self, log_dir: pathlib.Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.log_dir = log_dir
        self.n = 0
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], fault: dict | None = None, counts: pathlib.Path | None = None):
        self.n += 1
        log = self.log_dir / f"run{self.n}.log"
        pid = self._ask({"op": "start", "argv": argv, "fault": fault, "log": str(log),
                         "counts": str(counts) if counts else None})["pid"]
        return pid, log

    def wait(self, pid: int) -> int:
        return self._ask({"op": "wait", "pid": pid})["code"]

    def run(self, argv: list[str], **kw) -> tuple[int, str]:
        pid, log = self.start(argv, **kw)
        code = self.wait(pid)
        return code, log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # it holds no state; a torch process takes seconds to exit by itself
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ForkServer(tmp_path_factory.mktemp("logs"))
    yield s
    s.close()


def _wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ a lock on the run directory
def test_second_process_on_the_same_out_is_refused_and_a_killed_one_leaves_no_stale_lock(work, server, tmp_path):
    out = tmp_path / "out"
    long_plan = [a if a != "3" else "100000" for a in PLAN]  # retrofit-steps 100000: it trains until killed
    assert long_plan != PLAN
    pid, log = server.start(_argv(work, out, "--save-every", "1", plan=long_plan))
    metrics = out / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, "the first run's steps")
    for extra in (("--resume",), ()):
        code, _, stderr = run_cli(_argv(work, out, *extra, plan=long_plan))
        assert_one_line_error(code, stderr, f"another process (pid {pid}) is training into {out}")
    os.kill(pid, signal.SIGKILL)
    assert server.wait(pid) == -signal.SIGKILL
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer
    # the newest complete checkpoint: a kill between a checkpoint's rename and the update of its `latest` pointer
    # leaves a newer one than `latest` names, which --resume takes (Checkpointer.complete)
    from dmc.train.checkpoint import Checkpointer
    latest = int(Checkpointer(out / "run" / "checkpoints", runtime=None).latest().name.split("_")[1])
    # the kernel released the killed process's lock: --resume goes on
    code, stdout, stderr = run_cli(_argv(work, out, "--resume", "--max-steps", str(latest + 1), plan=long_plan))
    assert code == 0, stderr[-3000:]
    assert f"resuming from step_{latest:08d}" in stdout and f"stopped at step {latest + 1}/" in stdout


# ------------------------------------------------------------------------------ fault injection: kill, then --resume
FAST_SEEDS = [0, 1, 2, 3]
SLOW_SEEDS = list(range(4, 12))
SIGNALS = [("SIGKILL", "checkpoint"), ("SIGINT", "checkpoint"), ("SIGINT", "step"), ("SIGKILL", "step")]


@pytest.fixture(scope="module")
def uninterrupted(work, server, tmp_path_factory):
    """The run without faults (forked like the others) and how many events of each kind it has."""
    root = tmp_path_factory.mktemp("uninterrupted")
    code, log = server.run(_argv(work, root / "out"), counts=root / "counts.json")
    assert code == 0, log[-3000:]
    return root / "out", json.loads((root / "counts.json").read_text())


def _interrupt_and_resume(work, server, uninterrupted, tmp_path, seed):
    reference, counts = uninterrupted
    name, kind = SIGNALS[seed % len(SIGNALS)]
    at = random.Random(seed).randint(1, counts[kind])
    out = tmp_path / "out"
    code, log = server.run(_argv(work, out), fault={"kind": kind, "at": at, "signal": name})
    expected = -signal.SIGKILL if name == "SIGKILL" else 130
    assert code == expected, f"{name} at {kind} event {at}/{counts[kind]}: exit {code}\n{log[-3000:]}"
    assert not (out / "config.json").exists() or kind == "checkpoint"
    if name == "SIGINT":
        assert "Traceback" not in log and log.strip().splitlines()[-1] == "interrupted", log[-3000:]
    code, log = server.run(_argv(work, out, "--resume"))
    assert code == 0, f"resume after {name} at {kind} event {at}: exit {code}\n{log[-3000:]}"
    assert "Traceback" not in log
    a, b = model_tensors(reference), model_tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after {name} at {kind} event {at}"
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_kill_or_interrupt_then_resume_gives_the_uninterrupted_weights(work, server, uninterrupted, tmp_path, seed):
    _interrupt_and_resume(work, server, uninterrupted, tmp_path, seed)


@pytest.mark.skipif(not os.environ.get("DMC_SLOW_TESTS"), reason="more seeds: set DMC_SLOW_TESTS=1")
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_kill_or_interrupt_then_resume_more_seeds(work, server, uninterrupted, tmp_path, seed):
    _interrupt_and_resume(work, server, uninterrupted, tmp_path, seed)
