"""What a new user sees when a command cannot do what was asked, on CPU with tiny models: one line
naming the flag or the fix, exit status 2 for bad input, nothing loaded first, no traceback and no
warning with a source line."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import transformers

from test_inference_cli import ENGINE, TEXTS, data_dir, dmc_dir, tokenizer  # noqa: F401 (fixtures)

from dmc.cli.main import main
from dmc.tiny import write_tiny_model_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_EVAL = ["--max-windows", "2", "--recall-pairs", "0"]


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    """A plain model trained on 64 positions."""
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("short"), TEXTS, vocab_size=300, max_positions=64))


@pytest.fixture
def binary_dir(tmp_path):
    path = tmp_path / "binary"
    path.mkdir()
    (path / "a.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 20)
    (path / "b.txt").write_bytes(b"caf\xe9 " * 30)  # latin-1
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command loads model weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    import dmc.engine
    monkeypatch.setattr(dmc.engine, "LLM", refuse)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str, prefix: str) -> str:
    """The one line of ``err`` starting with ``prefix``; no traceback, no warning source line."""
    assert "Traceback" not in err and "Warning:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ eval: windows and positions
def test_eval_refuses_a_seq_len_longer_than_the_model_positions(short_dir, data_dir, tmp_path, capsys,
                                                                no_model_load):
    code, out, err = run(["eval", short_dir, "--data", data_dir, "--seq-len", "128", "--out",
                          str(tmp_path / "r.json"), *FAST_EVAL], capsys)
    assert code == 2 and out == ""
    assert one_line(err, "error:") == ("error: --seq-len 128 is longer than the model's 64 positions "
                                       "(max_position_embeddings): it would score positions the model never trained "
                                       "on; give --seq-len 64 or less")
    assert not (tmp_path / "r.json").exists()


def test_eval_default_window_is_the_model_positions_when_fewer_than_1024(short_dir, data_dir, tmp_path, capsys):
    code, out, err = run(["eval", short_dir, "--data", data_dir, "--out", str(tmp_path / "r.json"), *FAST_EVAL],
                         capsys)
    assert code == 0, err
    assert one_line(err, "note:") == "note: windows of 64 tokens, the model's positions (--seq-len to choose)"
    assert json.loads((tmp_path / "r.json").read_text())["seq_len"] == 64
    assert "perplexity (full sequence)" in out


# ------------------------------------------------------------------------------ eval and study: data that is no text
def test_eval_with_only_binary_files_says_so_before_loading(dmc_dir, binary_dir, capsys, no_model_load):
    code, out, err = run(["eval", dmc_dir, "--data", str(binary_dir), "--seq-len", "32", *FAST_EVAL], capsys)
    assert code == 2 and out == ""
    line = one_line(err, "error:")
    assert line.startswith("error: none of the 2 data files is UTF-8 text (e.g. ")
    assert "a.txt: a NUL byte at offset 4 (a binary file?))" in line
    assert "warning" not in err


def test_eval_skips_a_binary_file_in_one_warning_line(dmc_dir, data_dir, binary_dir, tmp_path, capsys):
    (binary_dir / "b.txt").unlink()
    code, out, err = run(["eval", dmc_dir, "--data", data_dir, str(binary_dir), "--seq-len", "32", *FAST_EVAL],
                         capsys)
    assert code == 0, err
    line = one_line(err, "warning:")
    assert line.startswith("warning: skipped 1 of 3 data files that are not UTF-8 text (")
    assert line.endswith("a.txt: a NUL byte at offset 4 (a binary file?))")
    assert "BadFileWarning" not in err and "eval.py" not in err


def test_eval_missing_data_is_called_held_out_data(dmc_dir, tmp_path, capsys, no_model_load):
    code, _, err = run(["eval", dmc_dir, "--data", str(tmp_path / "nonexistent")], capsys)
    assert code == 2
    assert one_line(err, "error:") == (f"error: held-out data (--data) '{tmp_path / 'nonexistent'}' does not exist "
                                       "(no file, directory or glob match)")


def test_study_with_only_binary_held_out_files_says_so_before_any_run(short_dir, data_dir, binary_dir, tmp_path,
                                                                      capsys, no_model_load):
    code, _, err = run(["study", short_dir, "--data", data_dir, "--heldout", str(binary_dir), "--crs", "2",
                        "--out", str(tmp_path / "study")], capsys)
    assert code == 2
    line = one_line(err, "error:")
    assert line.startswith("error: --heldout: none of the 2 data files is UTF-8 text (e.g. ")
    assert not (tmp_path / "study" / "runs").exists()


def test_study_missing_held_out_data_is_called_held_out_data(short_dir, data_dir, tmp_path, capsys):
    code, _, err = run(["study", short_dir, "--data", data_dir, "--heldout", str(tmp_path / "none"), "--crs", "2",
                        "--out", str(tmp_path / "study")], capsys)
    assert code == 2
    assert one_line(err, "error:") == (f"error: --heldout: held-out data '{tmp_path / 'none'}' does not exist (no "
                                       "file, directory or glob match)")


def test_retrofit_on_bad_file_error_names_the_flag(short_dir, binary_dir, data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.py").write_text(TEXTS[0])
    (data / "bad.txt").write_bytes((binary_dir / "a.txt").read_bytes())
    code, _, err = run(["retrofit", short_dir, "--data", str(data), "--out", str(tmp_path / "out"), "--on-bad-file",
                        "error", "--token-cache", str(tmp_path / "cache"), "--no-progress", "--seq-len", "32",
                        "--merge-delay", "0"], capsys)
    assert code == 2
    line = one_line(err, "error:")
    assert line.endswith("bad.txt is not UTF-8 text: a NUL byte at offset 4 (a binary file?); remove it from the "
                         "data, or pass --on-bad-file skip (on_bad_file: skip in a config file) to leave such "
                         "files out")


# ------------------------------------------------------------------------------ serve: a taken port
def test_serve_on_a_taken_port_fails_before_loading(short_dir, capsys, no_model_load):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(["serve", short_dir, "--device", "cpu", "--port", str(port)], capsys)
    assert code == 2 and out == ""
    assert one_line(err, "dmc serve:") == (f"dmc serve: --port {port}: address 127.0.0.1:{port} is already in use "
                                           "(another server?); pick another --port or stop the process that holds it")


# ------------------------------------------------------------------------------ noise
def test_a_checkpoint_prints_no_torch_distributed_warning(tmp_path):
    """torch's "assuming a single process" notice at every checkpoint save and load (shown here as
    Python shows warnings by default: -W default)."""
    script = f"""
import pathlib, torch
from dmc.train.checkpoint import Checkpointer
from dmc.train.distributed import Runtime
model = torch.nn.Linear(2, 2)
optimizer = torch.optim.AdamW(model.parameters())
ckpt = Checkpointer(pathlib.Path({str(tmp_path / 'ckpt')!r}), Runtime(0, 1, 0, torch.device("cpu")))
path = ckpt.save(model, optimizer, {{"step": 1}})
ckpt.load(model, optimizer, path)
print("saved and loaded")
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "saved and loaded"
    assert "torch.distributed is disabled" not in done.stderr and "Warning" not in done.stderr, done.stderr


def test_command_warnings_are_one_line_without_source(short_dir, data_dir):
    script = f"""
import sys, warnings
import dmc.cli.eval
def warn(args):
    warnings.warn("something to know", UserWarning)
    warnings.warn("deprecated thing", DeprecationWarning)
    return 0
dmc.cli.eval.run = warn
from dmc.cli.main import main
sys.exit(main(["eval", {short_dir!r}, "--data", {data_dir!r}]))
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["warning: something to know", "warning: deprecated thing (DeprecationWarning)"]


# ------------------------------------------------------------------------------ generate: the room in the context
def test_generate_refuses_max_tokens_beyond_the_context(short_dir, capsys, no_model_load):
    code, out, err = run(["generate", short_dir, "--prompt", "def f", "--max-tokens", "100000", "--device", "cpu"],
                         capsys)
    assert code == 2 and out == ""
    line = one_line(err, "dmc generate:")
    prompt = len(transformers.AutoTokenizer.from_pretrained(short_dir)("def f")["input_ids"])
    assert line == (f"dmc generate: --max-tokens 100000 does not fit: the prompt has {prompt} tokens of the model's "
                    f"context 64, leaving room for {64 - prompt} new tokens; give --max-tokens {64 - prompt} or less")


def test_generate_refuses_max_tokens_beyond_max_model_len_naming_both(short_dir, capsys, no_model_load):
    code, _, err = run(["generate", short_dir, "--prompt", "def f", "--prompt", "class A:\n    value = 3",
                        "--max-tokens", "40", "--device", "cpu", "--max-model-len", "32"], capsys)
    assert code == 2
    line = one_line(err, "dmc generate:")
    assert line.startswith("dmc generate: --max-tokens 40 does not fit: prompt 1 (the longest) has ")
    assert line.endswith(" or less, or raise --max-model-len") and "of --max-model-len 32, leaving room" in line


def test_generate_max_tokens_that_fit_run_to_the_end(short_dir, capsys):
    code, out, err = run(["generate", short_dir, "--prompt", "def f", "--max-tokens", "8", "--ignore-eos", "--json",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert row["finish_reason"] == "length" and len(row["token_ids"]) == 8


# ------------------------------------------------------------------------------ messages that point the right way
@pytest.mark.parametrize("command", ["generate", "bench", "eval", "gqa"])
def test_a_model_directory_without_weights_says_so(command, short_dir, data_dir, tmp_path, capsys, no_model_load):
    model = tmp_path / "m"
    model.mkdir()
    for f in pathlib.Path(short_dir).iterdir():
        if not f.name.endswith(".safetensors"):
            (model / f.name).write_bytes(f.read_bytes())
    args = {"generate": ["--prompt", "def", "--device", "cpu"], "bench": ["--device", "cpu"],
            "eval": ["--data", data_dir, "--device", "cpu"],
            "gqa": ["--ratio", "2", "--out", str(tmp_path / "o")]}[command]
    code, _, err = run([command, str(model), *args], capsys)
    assert code == 2
    prefix = "error:" if command in ("eval", "gqa") else f"dmc {command}:"
    assert one_line(err, prefix) == (f"{prefix} {model} holds a config.json but no weight file (model.safetensors, "
                                     "pytorch_model.bin, or sharded with an .index.json): the model was not saved or "
                                     "copied completely; save or copy it again")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_eviction_on_a_dmc_model_names_vanilla(command, dmc_dir, capsys, no_model_load):
    args = ["--prompt", "def"] if command == "generate" else []
    code, _, err = run([command, dmc_dir, *args, "--eviction", "tova", "--eviction-budget", "8", *ENGINE], capsys)
    assert code == 2
    assert one_line(err, f"dmc {command}:") == (
        f"dmc {command}: --eviction tova runs the model uncompressed, and {dmc_dir} is a DMC model: add --vanilla "
        "(every token appends; the eviction policy then keeps the budget)")


def test_eviction_on_a_dmc_model_with_vanilla_runs(dmc_dir, capsys):
    code, out, err = run(["generate", dmc_dir, "--prompt", "def", "--max-tokens", "12", "--ignore-eos", "--json",
                          "--vanilla", "--eviction", "tova", "--eviction-budget", "4", *ENGINE], capsys)
    assert code == 0, err
    assert json.loads(out)["finish_reason"] == "length"


# ------------------------------------------------------------------------------ bench on CPU
def test_bench_on_cpu_reports_the_peak_rss(short_dir, capsys):
    code, out, err = run(["bench", short_dir, "--prompt-len", "8", "--gen-len", "4", "--measure-steps", "2",
                          *ENGINE], capsys)
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    peak = float(line.split("peak memory ")[1].split(" GiB")[0])
    assert peak > 0.05 and " GiB (process RSS), KV pool " in line
    code, out, _ = run(["bench", short_dir, "--prompt-len", "8", "--gen-len", "4", "--measure-steps", "2", "--json",
                        *ENGINE], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["peak_memory_gib"] > 0.05


# ------------------------------------------------------------------------------ help texts and figures
def test_retrofit_help_shows_no_none_default_for_required_or_recipe_flags(capsys):
    with pytest.raises(SystemExit):
        main(["retrofit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training data: files, directories or globs of text, .jsonl or .parquet (required: no default)" in text
    assert "never the model's or the data's directory (required: no default)" in text
    assert "zero-out retrofit finetune hard (default: zero-out retrofit finetune hard; --preset paper: zero-out " \
           "retrofit finetune)" in text
    assert "while the CR lags) (default: dual; --preset paper: hinge)" in text
    assert "('none': no ceiling) (default: none)" in text  # 'none' is a value there, and the help says what it means
    assert "(continue later with --resume) (default: no limit)" in text


def test_heatmap_ticks_are_whole_heads_and_layers(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from dmc.eval import compression_heatmap
    from dmc.stats import CompressionStats
    ticks = {}
    close = plt.close

    def keep_ticks(fig):
        ax = fig.axes[0]
        ticks["x"], ticks["y"] = list(ax.get_xticks()), list(ax.get_yticks())
        ticks["xlim"], ticks["ylim"] = ax.get_xlim(), ax.get_ylim()
        close(fig)
    monkeypatch.setattr(plt, "close", keep_ticks)
    stats = CompressionStats(tokens=torch.full((3, 1, 2), 12), slots=torch.tensor([[[3, 4]], [[6, 12]], [[2, 3]]]))
    compression_heatmap(stats, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0
    shown = lambda values, lim: [v for v in values if min(lim) <= v <= max(lim)]  # noqa: E731
    assert shown(ticks["x"], ticks["xlim"]) == [0, 1]
    assert shown(ticks["y"], ticks["ylim"]) == [0, 1, 2]


def test_serve_checks_weights_and_eviction_before_loading(tmp_path):
    """dmc serve refuses a model directory without weights, and --eviction on a DMC model without --vanilla, in one
    line before anything loads (as generate and bench do)."""
    import json
    import subprocess
    import sys
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = subprocess.run([sys.executable, "-m", "dmc.cli.main", "serve", str(folder), "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "holds a config.json but no weight file" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
