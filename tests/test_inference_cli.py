"""The eval / generate / bench commands and the engine under them: nothing lost, nothing silently
wrong, one-line errors.

`dmc eval` checks its arguments and outputs before any work, prints each figure as it comes and keeps
what was computed when a later step fails (a non-finite perplexity included); the CPU page pool is sized
from the available memory and the error names the flags that help; `dmc generate --stream` reports a
failed request and honours --json; an abandoned stream aborts its request; and what used to end in a
traceback in these commands ends in one line.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import dmc_model

import dmc
import dmc.engine.cache as engine_cache
import dmc.engine.llm as engine_llm
from dmc.cli.main import main
from dmc.tiny import train_tokenizer, write_tiny_model_dir

TEXTS = ["def f(x):\n    return x * 2 + 1\n" * 40, "class A:\n    value = 3\n    name = 'a'\n" * 40]
ENGINE = ["--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "2"]
FAST_EVAL = ["--seq-len", "32", "--max-windows", "2", "--recall-pairs", "2", "--recall-trials", "1"]
DMC_BIN = pathlib.Path(sys.executable).parent / "dmc"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("plain"), TEXTS, vocab_size=300))


@pytest.fixture(scope="module")
def dmc_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("dmc")
    dmc_model("qwen3", window=4, vocab_size=300).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    for i, text in enumerate(TEXTS):
        (path / f"{i}.py").write_text(text)
    return str(path)


def _copy_model(src: str, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir()
    for f in pathlib.Path(src).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _one_line_error(err: str, prefix: str) -> str:
    """The single error line of a failed command (HF's own progress output may surround it)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


def _eval(args, capsys):
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- dmc eval


@pytest.mark.parametrize("case", ["out_under_a_file", "out_is_a_directory", "out_is_a_data_file",
                                  "heatmap_under_a_file", "out_equals_heatmap", "out_is_a_model_file"])
def test_eval_refuses_unwritable_outputs_before_any_work(case, dmc_dir, data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    data_file = pathlib.Path(data_dir) / "0.py"
    before = data_file.read_bytes()
    flags = {"out_under_a_file": ["--out", str(blocker / "report.json")],
             "out_is_a_directory": ["--out", str(tmp_path)],
             "out_is_a_data_file": ["--out", str(data_file)],
             "heatmap_under_a_file": ["--heatmap", str(blocker / "sub" / "h.png")],
             "out_equals_heatmap": ["--out", str(tmp_path / "x"), "--heatmap", str(tmp_path / "x")],
             "out_is_a_model_file": ["--out", str(pathlib.Path(dmc_dir) / "config.json")]}[case]
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, *flags], capsys)
    assert code == 2
    line = _one_line_error(err, "error:")
    assert ("--out" in line or "--heatmap" in line) and ("choose" in line or "give a file path" in line
                                                         or "same file" in line)
    assert out == ""  # refused before the first figure
    assert blocker.read_text() == "keep me" and data_file.read_bytes() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_refuses_a_read_only_out_folder(dmc_dir, data_dir, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(folder / "r.json")], capsys)
    finally:
        folder.chmod(0o755)
    assert code == 2 and out == ""
    assert "cannot be written" in _one_line_error(err, "error:")


def test_eval_refuses_an_out_it_cannot_create_a_file_in(dmc_dir, data_dir, tmp_path, capsys, monkeypatch):
    """A read-only folder as root sees it (the probe file cannot be created)."""
    import dmc.cli.eval as cli_eval

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_eval.tempfile, "NamedTemporaryFile", refuse)
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(tmp_path / "r.json")], capsys)
    assert code == 2 and out == ""
    line = _one_line_error(err, "error:")
    assert "--out" in line and "cannot be written (Permission denied)" in line and "writable path" in line


@pytest.mark.parametrize("flag,value", [("--recall-trials", "0"), ("--max-windows", "0"), ("--batch-size", "0"),
                                        ("--seq-len", "1"), ("--recall-pairs", "-1"), ("--max-windows", "-3")])
def test_eval_refuses_nonsense_numbers_before_any_work(flag, value, dmc_dir, data_dir, capsys):
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, flag, value], capsys)
    assert code == 2 and out == ""
    line = _one_line_error(err, "error:")
    assert flag in line and "must be >=" in line


def test_eval_recall_pairs_0_skips_the_probe_whatever_the_trials(dmc_dir, data_dir, capsys):
    code, out, _ = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--recall-pairs", "0", "--recall-trials", "0"],
                         capsys)
    assert code == 0 and "recall" not in out


def test_eval_creates_a_missing_out_folder_and_prints_every_figure(dmc_dir, data_dir, tmp_path, capsys):
    report_path = tmp_path / "new" / "deeper" / "report.json"
    heatmap = tmp_path / "plots" / "cr.png"
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(report_path),
                            "--heatmap", str(heatmap)], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["complete"] is True and "failed" not in report and report["windows"] == 2
    assert report["heatmap"] == str(heatmap) and heatmap.stat().st_size > 0
    lines = out.splitlines()
    assert lines[0].startswith("perplexity (full sequence): ")
    assert lines[1].startswith("perplexity (compressed cache): ")
    assert lines[2].startswith("realized CR: ")
    assert lines[3] == f"heatmap: {heatmap}"
    assert lines[4].startswith("perplexity (training mode, relaxed decisions): ")
    assert lines[5] == "recall: " + f"{report['recall']['accuracy']:.0%}" + " of 1 trials (2 pairs each)"
    assert lines[6].startswith("perplexity ") and "realized CR" in lines[6]  # the summary
    assert not list(report_path.parent.glob(".*"))  # no probe or temporary file left behind


def test_eval_heatmap_failure_still_writes_the_report_and_says_so(dmc_dir, data_dir, tmp_path, capsys, monkeypatch):
    import dmc.eval

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dmc.eval, "compression_heatmap", broken)
    report_path = tmp_path / "report.json"
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(report_path), "--heatmap",
                            str(tmp_path / "h.png")], capsys)
    assert code == 1 and "Traceback" not in err
    report = json.loads(report_path.read_text())
    assert report["perplexity_full_sequence"] > 1 and report["perplexity_relaxed"] > 1 and "recall" in report
    assert report["complete"] is False and report["failed"] == [
        f"heatmap {tmp_path / 'h.png'} not written (OSError: [Errno 28] No space left on device)"]
    assert "warning: heatmap" in err and "No space left on device" in err
    assert f"the report in {report_path} holds what was computed" in err
    assert "realized CR" in out  # the summary is still printed


def test_eval_heatmap_without_matplotlib_is_refused_before_any_work(dmc_dir, data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--heatmap", str(tmp_path / "h.png")], capsys)
    assert code == 2 and out == ""
    line = _one_line_error(err, "error:")
    assert "--heatmap needs matplotlib" in line and "pip install matplotlib" in line


def test_eval_later_failure_keeps_the_earlier_figures(dmc_dir, data_dir, tmp_path, capsys, monkeypatch):
    import dmc.eval

    def broken(*args, **kwargs):
        raise ValueError("the tokenizer cannot encode the probe")

    monkeypatch.setattr(dmc.eval, "recall_probe", broken)
    report_path = tmp_path / "report.json"
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(report_path)], capsys)
    assert code == 1
    assert _one_line_error(err, "error:") == "error: recall probe: the tokenizer cannot encode the probe"
    report = json.loads(report_path.read_text())
    assert report["perplexity_compressed_cache"] > 1 and report["compression"]["cr"] > 1
    assert report["complete"] is False and report["failed"] == ["recall probe: the tokenizer cannot encode the probe"]
    assert out.startswith("perplexity (full sequence): ")


def test_eval_bug_or_interrupt_mid_run_keeps_the_report(dmc_dir, data_dir, tmp_path, capsys, monkeypatch):
    import dmc.eval

    report_path = tmp_path / "report.json"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dmc.eval, "recall_probe", interrupted)
    code, out, _ = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(report_path)], capsys)
    assert code == 130
    report = json.loads(report_path.read_text())
    assert report["perplexity_relaxed"] > 1 and report["failed"] == ["interrupted"] and not report["complete"]

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(dmc.eval, "recall_probe", bug)
    report_path.unlink()
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback, but not at the report's cost
        main(["eval", dmc_dir, "--data", data_dir, *FAST_EVAL, "--out", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["perplexity_full_sequence"] > 1 and not report["complete"]


def test_eval_report_that_cannot_be_written_at_the_end_is_printed(dmc_dir, data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    import dmc.cli.eval as cli_eval

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli_eval, "write_atomically", full_disk)
    code, out, err = _eval([dmc_dir, "--data", data_dir, *FAST_EVAL, "--recall-pairs", "0", "--out",
                            str(tmp_path / "r.json")], capsys)
    assert code == 1 and "Traceback" not in err
    assert "the report could not be written (No space left on device); here it is:" in err
    start = out.index("{\n")
    report = json.JSONDecoder().raw_decode(out[start:])[0]
    assert report["perplexity_full_sequence"] > 1 and report["compression"]["cr"] > 1


def test_eval_nan_perplexity_says_so_and_fails(tokenizer, data_dir, tmp_path, capsys):
    model = dmc_model("qwen3", window=4, vocab_size=300)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    report_path = tmp_path / "report.json"
    code, out, err = _eval([str(tmp_path / "m"), "--data", data_dir, *FAST_EVAL, "--out", str(report_path)], capsys)
    assert code == 1
    line = _one_line_error(err, "error:")
    assert "perplexity (full sequence) is not finite" in line and "NaN" in line
    report = json.loads(report_path.read_text())  # strict JSON: NaN written as null
    assert report["perplexity_full_sequence"] is None and report["complete"] is False
    assert "perplexity_compressed_cache" not in report and "recall" not in report
    assert "nan" not in out.lower()  # no summary made of NaN


def test_eval_no_window_of_seq_len_is_a_one_line_error(dmc_dir, data_dir, tmp_path, capsys):
    code, out, err = _eval([dmc_dir, "--data", data_dir, "--seq-len", "100000", "--out", str(tmp_path / "r.json")],
                           capsys)
    assert code == 2 and out == ""
    assert "no text holds 100000 tokens" in _one_line_error(err, "error:")
    assert not (tmp_path / "r.json").exists()


def test_eval_plain_model_heatmap_is_a_note(plain_dir, data_dir, tmp_path, capsys):
    code, out, err = _eval([plain_dir, "--data", data_dir, *FAST_EVAL, "--heatmap", str(tmp_path / "h.png")], capsys)
    assert code == 0 and "note: --heatmap" in err and "plain model" in err
    assert not (tmp_path / "h.png").exists()


def test_library_functions_refuse_nonsense(tokenizer):
    from dmc.eval import perplexity, recall_probe
    model = dmc_model("llama", window=4, vocab_size=300)
    with pytest.raises(ValueError, match="trials must be an integer >= 1"):
        recall_probe(model, tokenizer, pairs=2, trials=0)
    with pytest.raises(ValueError, match="max_windows must be"):
        perplexity(model, tokenizer, TEXTS, seq_len=16, max_windows=0)
    with pytest.raises(ValueError, match="batch_size must be"):
        perplexity(model, tokenizer, TEXTS, seq_len=16, batch_size=0)


# ---------------------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("command", ["eval", "generate", "bench"])
@pytest.mark.parametrize("damage", ["corrupt_config", "truncated_weights", "bad_dmc_window", "bad_attn_impl"])
def test_broken_model_directory_is_a_one_line_error(command, damage, dmc_dir, data_dir, tmp_path, capsys):
    model = _copy_model(dmc_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    if damage == "corrupt_config":
        (model / "config.json").write_text('{"model_type": "dmc_qw')
    elif damage == "truncated_weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:
        config["dmc"].update({"window": 0} if damage == "bad_dmc_window" else {"attn_implementation": "foo"})
        (model / "config.json").write_text(json.dumps(config))
    args = {"eval": ["eval", str(model), "--data", data_dir, *FAST_EVAL],
            "generate": ["generate", str(model), "--prompt", "def", *ENGINE],
            "bench": ["bench", str(model), "--prompt-len", "8", "--gen-len", "4", *ENGINE]}[command]
    assert main(args) == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err, "error:" if command == "eval" else f"dmc {command}:")
    expected = {"corrupt_config": "not a valid JSON file", "truncated_weights": "truncated or corrupt",
                "bad_dmc_window": "DMC window must be a positive integer", "bad_attn_impl": "attn_implementation"}
    assert expected[damage] in line
    if damage == "truncated_weights":
        assert "copy or save the model again" in line


def test_truncated_weights_in_a_real_process_print_no_traceback(plain_dir, tmp_path):
    model = _copy_model(plain_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    done = subprocess.run([str(DMC_BIN), "generate", str(model), "--prompt", "def", *ENGINE], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert _one_line_error(done.stderr, "dmc generate:").endswith("copy or save the model again")


def test_flags_of_other_commands_are_argparse_errors(plain_dir, data_dir, capsys):
    """--window / --attn-implementation are retrofit settings: eval and generate answer with usage."""
    for args in (["eval", plain_dir, "--data", data_dir, "--window", "0"],
                 ["generate", plain_dir, "--prompt", "x", "--attn-implementation", "foo"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "unrecognized arguments" in err


def test_temperature_0_is_greedy_and_negative_is_a_one_line_error(plain_dir, capsys):
    assert main(["generate", plain_dir, "--prompt", "def", "--max-tokens", "3", "--ignore-eos", "--temperature", "0",
                 "--json", *ENGINE]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
    assert main(["generate", plain_dir, "--prompt", "def", "--temperature", "-1", *ENGINE]) == 2
    assert "temperature must be a finite number >= 0" in _one_line_error(capsys.readouterr().err, "dmc generate:")


@pytest.mark.parametrize("content,expected", [
    ('{"text": "no prompt here"}\n', "p.jsonl:1 has no 'prompt' field"),
    ('{"prompt": "ok"}\n{"prompt": \n', "p.jsonl:2 is not valid JSON"),
    ('["a list"]\n', "p.jsonl:1 has no 'prompt' field"),
    ('{"prompt": 3}\n', "p.jsonl:1: 'prompt' must be a string"),
])
def test_bad_prompt_file_lines_name_file_and_line(content, expected, plain_dir, tmp_path, capsys):
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text(content)
    assert main(["generate", plain_dir, "--prompt-file", str(prompt_file), *ENGINE]) == 2
    assert expected in _one_line_error(capsys.readouterr().err, "dmc generate:")
    assert main(["generate", plain_dir, "--prompt-file", str(tmp_path / "missing.txt"), *ENGINE]) == 2
    assert "cannot read --prompt-file" in _one_line_error(capsys.readouterr().err, "dmc generate:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "generate", "bench"])
def test_device_cuda_without_cuda_is_a_one_line_error(command, plain_dir, data_dir, capsys):
    engine = ["--max-model-len", "64"]
    args = {"eval": ["eval", plain_dir, "--data", data_dir, *FAST_EVAL],
            "generate": ["generate", plain_dir, "--prompt", "x", *engine],
            "bench": ["bench", plain_dir, "--prompt-len", "8", "--gen-len", "4", *engine]}[command]
    prefix = "error:" if command == "eval" else f"dmc {command}:"
    assert main([*args, "--device", "cuda"]) == 2
    assert "use --device cpu" in _one_line_error(capsys.readouterr().err, prefix)
    assert main([*args, "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'" in _one_line_error(capsys.readouterr().err, prefix)
    with pytest.raises(ValueError, match="use --device cpu"):
        engine_llm.resolve_device("cuda:0")


@pytest.mark.parametrize("flags,expected", [
    (["--max-model-len", "0"], "--max-model-len must be >= 2"),
    (["--max-model-len", "-5"], "--max-model-len must be >= 2"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
    (["--kv-cache-memory-gib", "-1"], "--kv-cache-memory-gib must be > 0"),
])
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_nonsense_engine_settings_are_refused(command, flags, expected, plain_dir, capsys):
    args = (["generate", plain_dir, "--prompt", "x"] if command == "generate"
            else ["bench", plain_dir, "--prompt-len", "8", "--gen-len", "4"])
    assert main([*args, "--device", "cpu", *flags]) == 2
    captured = capsys.readouterr()
    assert expected in _one_line_error(captured.err, f"dmc {command}:") and captured.out == ""


def test_engine_python_api_refuses_nonsense_too():
    model = dmc_model("llama")
    for kwargs, expected in (({"max_model_len": 0}, "max_model_len must be an integer >= 2"),
                             ({"max_model_len": -3}, "max_model_len must be an integer >= 2"),
                             ({"forced_period": -2}, "forced_period must be an integer >= 0"),
                             ({"kv_cache_memory": 0}, "kv_cache_memory must be a positive"),
                             ({"device": "nonsense"}, "unknown device")):
        with pytest.raises(ValueError, match=expected):
            dmc.LLM(model, **{"device": "cpu", "progress": False, **kwargs})


@pytest.mark.parametrize("flags,expected", [
    (["--prompt-len", "100", "--gen-len", "4"], "--prompt-len + --gen-len = 104 tokens does not fit --max-model-len 64"),
    (["--prompt-len", "8", "--gen-len", "4", "--measure-steps", "0"], "--measure-steps must be >= 1"),
    (["--prompt-len", "8", "--gen-len", "4", "--forced-cr", "-2"], "--forced-cr must be 0 (off) or an integer CR >= 1"),
    (["--prompt-len", "8", "--gen-len", "1"], "--gen-len >= 2"),
])
def test_bench_settings_that_cannot_measure_are_refused(flags, expected, plain_dir, capsys):
    assert main(["bench", plain_dir, *flags, *ENGINE]) == 2
    captured = capsys.readouterr()
    assert expected in _one_line_error(captured.err, "dmc bench:") and captured.out == ""


def test_measure_throughput_refuses_a_prompt_that_does_not_fit():
    from dmc.engine.bench import measure_throughput
    llm = dmc.LLM(dmc_model("llama"), device="cpu", max_model_len=32, max_num_seqs=2, progress=False)
    with pytest.raises(ValueError, match="does not fit max_model_len"):
        measure_throughput(llm, prompt_len=40, gen_len=4, progress=False)
    with pytest.raises(ValueError, match="measure_steps >= 1"):
        measure_throughput(llm, prompt_len=8, gen_len=4, measure_steps=0, progress=False)


def test_bench_shows_a_prefill_progress_bar(plain_dir, capsys):
    assert main(["bench", plain_dir, "--prompt-len", "8", "--gen-len", "4", "--measure-steps", "2", *ENGINE]) == 0
    captured = capsys.readouterr()
    assert "prefill" in captured.err and "16/16" in captured.err  # 2 prompts of 8 tokens
    assert "output tok/s at batch 2" in captured.out


@pytest.mark.parametrize("command", ["eval", "generate", "bench"])
def test_help_texts_show_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    expected = {"eval": ["--seq-len SEQ_LEN [SEQ_LEN ...] tokens per evaluation window, >= 2 (default: 1024)",
                         "windows of seq-len tokens (default: 64)", "(default: 20)", "(default: text)"],
                "generate": ["most new tokens per prompt (default: 128)", "0 = greedy (default: 0.0)",
                             "--max-num-seqs MAX_NUM_SEQS most sequences decoded together (default: 256)"],
                "bench": ["tokens of every random prompt (default: 1024)", "(default: 0.9)"]}[command]
    for snippet in expected:
        assert snippet in text
    assert "(default: None)" not in text and "(default: False)" not in text


# ---------------------------------------------------------------------------------------------- the CPU page pool


def test_cpu_pool_is_sized_from_available_memory(tmp_path, monkeypatch, capsys):
    """A model whose one full-length sequence needs more than the old fixed 256 MiB now runs on CPU."""
    model = write_tiny_model_dir(tmp_path / "long", TEXTS, vocab_size=300, max_positions=600_000)
    monkeypatch.setattr(engine_cache, "_available_host_memory", lambda: 2 * 2**30)
    assert main(["generate", str(model), "--prompt", "def", "--max-tokens", "2", "--ignore-eos", "--json",
                 "--device", "cpu", "--max-num-seqs", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
    llm = dmc.LLM(model, device="cpu", max_num_seqs=1, progress=False)
    layout = llm.cache.layout
    assert layout.max_model_len == 600_000
    pool = layout.num_pages * layout.page_bytes(llm.dtype)
    assert 256 * 2**20 < pool <= min(engine_cache.CPU_KV_CACHE_CAP, 0.4 * 2 * 2**30)
    assert layout.num_pages == layout.rows * layout.pages_per_head + 1  # no more than one sequence can use


def test_cpu_pool_error_names_the_flags_that_help(tmp_path, monkeypatch, capsys):
    model = write_tiny_model_dir(tmp_path / "long", TEXTS, vocab_size=300, max_positions=600_000)
    monkeypatch.setattr(engine_cache, "_available_host_memory", lambda: 200 * 2**20)
    assert main(["generate", str(model), "--prompt", "def", "--device", "cpu", "--max-num-seqs", "1"]) == 2
    line = _one_line_error(capsys.readouterr().err, "dmc generate:")
    assert "not enough memory for the KV cache" in line and "on CPU: 40% of the memory available" in line
    assert "--max-model-len" in line and "--kv-cache-memory-gib" in line
    assert "gpu_memory_utilization" not in line and "gpu-memory-utilization" not in line
    advice = line.split("Either ")[1]
    assert advice == ("lower max_model_len (--max-model-len), or give the cache more memory with kv_cache_memory "
                      "(--kv-cache-memory-gib).")  # not max_num_seqs: its tables are not what is missing
    # following the advice works
    assert main(["generate", str(model), "--prompt", "def", "--max-tokens", "2", "--device", "cpu",
                 "--max-num-seqs", "1", "--max-model-len", "4096"]) == 0


def test_small_cpu_pool_is_only_as_large_as_the_sequences_need():
    llm = dmc.LLM(dmc_model("llama"), device="cpu", max_model_len=64, max_num_seqs=2, progress=False)
    layout = llm.cache.layout
    assert layout.num_pages == 2 * layout.rows * layout.pages_per_head + 1


# ---------------------------------------------------------------------------------------------- generate --stream


def test_stream_reports_a_failed_request_like_the_plain_form(plain_dir, capsys):
    long_prompt = "def f " * 80  # more tokens than --max-model-len 64
    assert main(["generate", plain_dir, "--prompt", long_prompt, *ENGINE]) == 1
    plain = capsys.readouterr().out
    assert main(["generate", plain_dir, "--prompt", long_prompt, "--stream", *ENGINE]) == 1
    streamed = capsys.readouterr().out
    assert streamed == plain
    assert streamed.startswith("--- prompt 0: error: prompt of ") and "max_model_len is 64" in streamed


def test_stream_json_prints_json_lines(plain_dir, capsys):
    assert main(["generate", plain_dir, "--prompt", "def", "--max-tokens", "4", "--ignore-eos", "--stream", "--json",
                 *ENGINE]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["finished"] for line in lines] == [False] * (len(lines) - 1) + [True]
    last = lines[-1]
    assert last["finish_reason"] == "length" and last["error"] is None and last["compression"]["cr"] == 1.0
    assert sum((line["new_token_ids"] for line in lines), []) == last["token_ids"] and len(last["token_ids"]) == 4
    assert "".join(line["new_text"] for line in lines) == last["text"]
    # a failed request in JSON: one line saying why, exit 1
    assert main(["generate", plain_dir, "--prompt", "def f " * 80, "--stream", "--json", *ENGINE]) == 1
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["finish_reason"] == "error" and "max_model_len" in line["error"]


def test_stream_takes_one_prompt(plain_dir, capsys):
    assert main(["generate", plain_dir, "--prompt", "a", "--prompt", "b", "--stream", *ENGINE]) == 2
    assert "--stream takes one prompt, got 2" in _one_line_error(capsys.readouterr().err, "dmc generate:")


# ---------------------------------------------------------------------------------------------- an abandoned stream


def _llm(model):
    return dmc.LLM(model, device="cpu", max_model_len=64, max_num_seqs=4, progress=False)


def test_breaking_out_of_a_stream_aborts_its_requests():
    model = dmc_model("llama")
    params = dmc.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    llm = _llm(model)
    free = llm.initial_free_pages
    updates = 0
    for update in llm.stream([[5, 6, 7, 8], [9, 10, 11]], params):
        updates += 1
        if updates == 3:
            break
    assert not llm.has_unfinished()
    assert llm.cache.free_page_count() == free and llm.cache.free_row_count() == llm.cache.layout.max_seqs
    # the next call decodes only its own request, as on a fresh engine
    after = llm.generate([[1, 2, 3]], dmc.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    fresh = _llm(model).generate([[1, 2, 3]], dmc.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert after[0].token_ids == fresh[0].token_ids and len(after) == 1
    assert llm.cache.free_page_count() == free


def test_closing_a_stream_aborts_and_reports_aborted():
    llm = _llm(dmc_model("llama"))
    params = dmc.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    mine = llm.add_request([4, 4, 4], params)  # someone else's request keeps running
    stream = llm.stream([[5, 6, 7, 8]], params)
    first = next(stream)
    stream.close()
    assert not first.finished
    assert mine.finish_reason is None and llm.has_unfinished()
    assert llm.abort(mine.id) is True and mine.finish_reason == "aborted"
    assert llm.cache.free_page_count() == llm.initial_free_pages


def test_abort_takes_a_request_id():
    llm = _llm(dmc_model("llama"))
    params = dmc.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    waiting = llm.add_request([1, 2, 3], params)
    assert llm.abort(waiting.id) is True and waiting.finish_reason == "aborted"
    running = llm.add_request([1, 2, 3, 4], params)
    llm.step()
    assert running.row is not None
    assert llm.abort(running.id) is True and running.finish_reason == "aborted" and running.row is None
    assert llm.abort(running.id) is False  # finished already
    assert llm.abort(running) is False
    with pytest.raises(ValueError, match="no request has id 99"):
        llm.abort(99)
    out = llm.generate([[1, 2, 3]], params)[0]
    assert llm.abort(out.request_id) is False and out.finish_reason == "length"
    assert llm.cache.free_page_count() == llm.initial_free_pages
