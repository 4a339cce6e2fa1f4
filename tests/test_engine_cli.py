"""`dmc generate` and `dmc bench` on a tiny model directory (CPU)."""

import json

import pytest

from dmc.cli.main import main
from dmc.tiny import write_tiny_model_dir

TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 20
ENGINE = ["--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("tiny"), TEXTS, vocab_size=300))


def test_generate_prints_text_and_compression(model_dir, capsys):
    assert main(["generate", model_dir, "--prompt", "def f", "--prompt", "import", "--max-tokens", "6",
                 "--ignore-eos", "--json", *ENGINE]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def f", "import"]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in rows)
    assert all(r["compression"]["cr"] == 1.0 for r in rows)  # a plain model runs uncompressed


def test_generate_streams(model_dir, capsys):
    assert main(["generate", model_dir, "--prompt", "def f", "--max-tokens", "5", "--ignore-eos", "--stream",
                 *ENGINE]) == 0
    assert "[length; CR 1.00" in capsys.readouterr().out


def test_bench_reports_forced_compression(model_dir, capsys):
    assert main(["bench", model_dir, "--prompt-len", "16", "--gen-len", "16", "--measure-steps", "8",
                 "--forced-cr", "4", "--json", *ENGINE]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["batch"] == 4 and result["tokens_per_s"] > 0
    assert result["realized_cr"] == pytest.approx(4.0, rel=0.1)


def test_errors_exit_2(model_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x", *ENGINE]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", model_dir, *ENGINE]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["generate", model_dir, "--prompt", "x", "--top-p", "0", *ENGINE]) == 2
    assert "top_p" in capsys.readouterr().err
