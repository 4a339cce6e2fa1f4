"""Evaluation: perplexity in both modes, compression report and heatmap, recall probe, `dmc eval`."""

import json
import math
import random

import pytest
import torch
from conftest import dmc_model, stock_model

from dmc.cli.main import main as cli
from dmc.eval import compression_heatmap, compression_report, perplexity, recall_probe
from dmc.eval.recall import make_trial
from dmc.tiny import train_tokenizer

TEXTS = ["def f(x):\n    return x * 2 + 1\n" * 40, "class A:\n    value = 3\n    name = 'a'\n" * 40]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def _model(family, **kw):
    return dmc_model(family, window=4, vocab_size=300, **kw)


def test_perplexity_modes_agree_and_match_the_model_loss(tokenizer):
    model = _model("qwen2")
    full = perplexity(model, tokenizer, TEXTS, seq_len=32, mode="full", batch_size=3)
    cached = perplexity(model, tokenizer, TEXTS, seq_len=32, mode="cache", batch_size=2)
    assert full.windows == cached.windows > 3
    assert cached.loss == pytest.approx(full.loss, rel=1e-5)  # the compressed cache is exact (spec §7.3)
    assert cached.compression.overall_cr == pytest.approx(full.compression.overall_cr)
    assert 1.3 < cached.compression.overall_cr < 4  # merges happen
    first = tokenizer(TEXTS[0], return_tensors="pt").input_ids[:, :32]
    one = perplexity(model, tokenizer, [TEXTS[0]], seq_len=32, max_windows=1)
    with torch.no_grad():
        assert one.loss == pytest.approx(float(model(first, labels=first).lm_loss), rel=1e-5)
    assert one.perplexity == pytest.approx(math.exp(one.loss))


def test_relaxed_mode_is_the_seeded_training_forward(tokenizer):
    """mode="relaxed" is the retrofit's view (noisy relaxed decisions): seeded, so repeatable, not the
    hard-decision loss, equal to the training-mode loss by hand, and the model's mode is restored."""
    model = _model("llama")
    full = perplexity(model, tokenizer, TEXTS, seq_len=32, max_windows=4, batch_size=2)
    relaxed = perplexity(model, tokenizer, TEXTS, seq_len=32, max_windows=4, batch_size=2, mode="relaxed")
    again = perplexity(model, tokenizer, TEXTS, seq_len=32, max_windows=4, batch_size=2, mode="relaxed")
    assert not model.training
    assert relaxed.loss == again.loss and relaxed.loss != pytest.approx(full.loss, rel=1e-4)
    first = tokenizer(TEXTS[0], return_tensors="pt").input_ids[:, :32]
    one = perplexity(model, tokenizer, [TEXTS[0]], seq_len=32, max_windows=1, mode="relaxed")
    model.train()
    with torch.no_grad():
        by_hand = float(model(first, labels=first, dmc_generator=torch.Generator().manual_seed(0)).lm_loss)
    model.eval()
    assert one.loss == pytest.approx(by_hand, rel=1e-5)


def test_perplexity_errors(tokenizer):
    with pytest.raises(ValueError, match="plain model"):
        perplexity(stock_model("llama", vocab_size=300), tokenizer, TEXTS, seq_len=32, mode="cache")
    with pytest.raises(ValueError, match="plain model"):
        perplexity(stock_model("llama", vocab_size=300), tokenizer, TEXTS, seq_len=32, mode="relaxed")
    with pytest.raises(ValueError, match="no text holds"):
        perplexity(_model("llama"), tokenizer, ["short"], seq_len=32)


def test_compression_report_and_heatmap(tokenizer, tmp_path):
    stats = perplexity(_model("llama"), tokenizer, TEXTS, seq_len=32, mode="cache").compression
    report = compression_report(stats)
    assert report["cr"] == pytest.approx(report["tokens"] / report["slots"])
    assert len(report["per_head_cr"]) == 2 and len(report["per_head_cr"][0]) == 4
    compression_heatmap(stats, tmp_path / "cr.png")
    assert (tmp_path / "cr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recall_trials_are_well_formed_and_probe_is_deterministic(tokenizer):
    prompt, answer = make_trial(random.Random(0), pairs=6)
    lines = prompt.splitlines()
    assert len(lines) == 7 and lines[-1].endswith(" =")
    key = lines[-1][:-2]
    assert f"{key} ={answer}" in lines[:-1]
    model = _model("llama")
    a = recall_probe(model, tokenizer, pairs=5, trials=3, seed=1)
    b = recall_probe(model, tokenizer, pairs=5, trials=3, seed=1)
    assert a == b and 0 <= a["accuracy"] <= 1 and a["mean_prompt_tokens"] > 5 * 4


def test_dmc_eval_cli(tokenizer, tmp_path, capsys):
    model = _model("qwen3")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(TEXTS):
        (data / f"{i}.py").write_text(text)
    out = tmp_path / "report.json"
    assert cli(["eval", str(tmp_path / "m"), "--data", str(data), "--seq-len", "32", "--recall-pairs", "4",
                "--recall-trials", "2", "--out", str(out), "--heatmap", str(tmp_path / "h.png")]) == 0
    report = json.loads(out.read_text())
    assert report["perplexity_compressed_cache"] == pytest.approx(report["perplexity_full_sequence"], rel=1e-4)
    assert report["compression"]["cr"] > 1.3 and report["recall"]["trials"] == 2
    assert report["perplexity_relaxed"] > 1 and report["perplexity_relaxed"] != report["perplexity_full_sequence"]
    assert (tmp_path / "h.png").exists()
    assert "realized CR" in capsys.readouterr().out
    assert cli(["eval", str(tmp_path), "--data", str(data)]) == 2
