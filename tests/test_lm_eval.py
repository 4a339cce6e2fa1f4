"""The lm-evaluation-harness plugin (`--model dmc`): offline tasks over a local JSONL file, a tiny
DMC model, the realized CR recorded with the results in both modes (full-sequence and cache)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import sys

import pytest
import torch
import transformers
from conftest import dmc_model, stock_model, write_lm_eval_tasks

from dmc.tiny import train_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is first imported (by lm_eval)
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager

from dmc.eval.harness import DMCLM, cli_evaluate

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six", "red green blue"]
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> pathlib.Path:
    """A DMC model and a stock model with one tokenizer, six documents and three task YAMLs
    (multiple choice → loglikelihood, perplexity → loglikelihood_rolling, generate_until)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=120)
    for name, model in (("dmc", dmc_model("llama", vocab_size=len(tokenizer))),
                        ("plain", stock_model("llama", vocab_size=len(tokenizer)))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    docs = [{"q": f"item {i}: the cat", "choices": ["sat on the mat", "ran in the park"], "label": i % 2,
             "text": " ".join(TEXTS[i % 4].split() * (i + 2))} for i in range(6)]
    write_lm_eval_tasks(root, docs, "tiny")
    (root / "docs.json").write_text(json.dumps(docs))
    return root


def _evaluate(workspace: pathlib.Path, model_dir: str, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(model="dmc", model_args=f"pretrained={workspace / model_dir}", tasks=tasks,
                                   task_manager=TaskManager(include_path=str(workspace / "tasks"),
                                                            include_defaults=False),
                                   device="cpu", batch_size=4)  # batches of unequal rows: padding


def test_registered_by_import_and_by_entry_point():
    from lm_eval.api.registry import get_model
    assert get_model("dmc") is DMCLM  # importing dmc.eval.harness registered it
    (entry,) = [e for e in importlib.metadata.entry_points(group="lm_eval.models") if e.name == "dmc"]
    assert entry.load() is DMCLM  # what lm-eval releases after 0.4.13 discover by themselves


def test_results_carry_the_realized_cr_of_each_task_and_mode(workspace):
    results = _evaluate(workspace, "dmc", TASKS)
    assert set(results["results"]) == set(TASKS)
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1
    assert results["results"]["tiny_ppl"]["word_perplexity,none"] > 1
    assert "exact_match,none" in results["results"]["tiny_gen"]
    report = results["config"]["dmc_compression"]
    assert report["is_dmc"] is True
    by_task = report["by_task"]
    assert set(by_task) == set(TASKS)
    assert by_task["tiny_mc"]["loglikelihood"]["mode"] == "full-sequence"
    assert by_task["tiny_gen"]["generate_until"]["mode"] == "cache"
    for entry in (by_task["tiny_mc"]["loglikelihood"], by_task["tiny_gen"]["generate_until"]):
        assert 1.2 < entry["cr"] < 3.0  # the tiny model merges 30-60% of tokens
        assert len(entry["per_layer_cr"]) == 2
    assert set(report["overall"]) == {"full-sequence", "cache"}

    # the rolling task, recomputed by hand: one window per document, [BOS] + tokens[:-1]; the
    # harness ran them in padded batches of 4, and the padding must not count
    tokenizer = transformers.AutoTokenizer.from_pretrained(workspace / "dmc")
    model = transformers.AutoModelForCausalLM.from_pretrained(workspace / "dmc").eval()
    tokens = slots = 0.0
    for doc in json.loads((workspace / "docs.json").read_text()):
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        with torch.no_grad():
            stats = model(torch.tensor([[tokenizer.bos_token_id] + ids[:-1]]), use_cache=False).compression
        tokens, slots = tokens + float(stats.tokens.sum()), slots + float(stats.slots.sum())
    rolling = by_task["tiny_ppl"]["loglikelihood_rolling"]
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert rolling["tokens"] * heads == tokens
    assert rolling["cr"] == pytest.approx(tokens / slots, rel=0.01)

    # generation: every prompt token went through the cache, plus what was generated
    prompts = sum(len(tokenizer(d["q"], add_special_tokens=False).input_ids)
                  for d in json.loads((workspace / "docs.json").read_text()))
    assert prompts <= by_task["tiny_gen"]["generate_until"]["tokens"] <= prompts + 6 * 8


def test_plain_model_directories_work_too(workspace):
    results = _evaluate(workspace, "plain", ["tiny_mc"])
    assert "acc,none" in results["results"]["tiny_mc"]
    assert results["config"]["dmc_compression"]["is_dmc"] is False


def test_command_line_saves_and_prints_the_cr(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", [
        "dmc-lm-eval", "--model", "dmc", "--model_args", f"pretrained={workspace / 'dmc'}", "--tasks", "tiny_mc",
        "--include_path", str(workspace / "tasks"), "--device", "cpu", "--batch_size", "2",
        "--output_path", str(out), "--show_config"])
    cli_evaluate()
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and '"dmc_compression"' in printed
    (saved,) = out.rglob("results_*.json")
    report = json.loads(saved.read_text())["config"]["dmc_compression"]
    assert report["by_task"]["tiny_mc"]["loglikelihood"]["cr"] > 1.2
