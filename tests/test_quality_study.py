"""The from-scratch quality study (experiments/quality_study.py, on top of `dmc study`): the smoke
pipeline end to end on the CPU, the structure of what it writes, held-out packages kept out of
training, idempotent re-runs; and the streaming evaluation the study uses for the eviction baselines
(dmc.eval.streaming)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import string
import sys

import pytest
import torch
from conftest import dmc_model

import dmc
from dmc.baselines import EvictionCache, EvictionPolicy
from dmc.eval import perplexity
from dmc.eval.recall import make_trial
from dmc.eval.streaming import streaming_perplexity, streaming_recall_probe
from dmc.tiny import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "experiments" / "quality_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run (tiny model, few steps): CR 4 and 8 to keep it short (GQA 8x is skipped: 4 KV heads)."""
    root = tmp_path_factory.mktemp("quality")
    study = _study()
    args = ["--smoke", "--work", str(root / "work"), "--out", str(root / "docs"), "--crs", "4", "8"]
    status = study.main(args)
    return study, root, args, status


def test_smoke_pipeline_writes_the_report(smoke):
    _, root, _, status = smoke
    assert status == 0
    out = root / "docs" / "results" / "quality"
    result = json.loads((out / "results.json").read_text())
    rows = {(r["run"], r.get("budget_kind")): r for r in result["rows"]}
    evictions = {(f"{m}@{cr}", k) for m in ("h2o", "tova") for cr in (4, 8) for k in ("nominal", "matched")}
    assert set(rows) == {("original", None), ("plain", None), ("dmc@4", None), ("dmc@8", None),
                         ("gqa@4", None)} | evictions
    assert [s["run"] for s in result["skipped"]] == ["gqa@8"] and not result["pending"]
    for row in rows.values():
        for key in ("method", "target_cr", "realized_cr", "perplexity", "loss", "tokens", "ratio_to_plain"):
            assert key in row, (row["run"], key)
        assert row["perplexity"] > 1
    # every continued run got the same tokens: the plan, a share of the pretraining tokens
    pretraining = result["meta"]["from_scratch"]["pretraining"]
    trained = [rows[(n, None)] for n in ("plain", "dmc@4", "dmc@8", "gqa@4")]
    assert len({r["tokens"] for r in trained}) == 1 and 0 < trained[0]["tokens"] <= pretraining["tokens"]
    assert rows[("original", None)]["tokens"] == 0 and pretraining["tokens"] > 0
    assert rows[("dmc@8", None)]["loss_relaxed"] > 0 and len(rows[("dmc@8", None)]["compression"]["per_head_cr"]) == 2
    # eviction on the plain continued model, budget matched to DMC's realized CR at the same target
    window = result["meta"]["evaluation"]["window_tokens"]
    for cr in (4, 8):
        h2o = rows[(f"h2o@{cr}", "matched")]
        assert h2o["budget_cr"] == pytest.approx(rows[(f"dmc@{cr}", None)]["realized_cr"])
        assert h2o["budget"] == -(-window // h2o["budget_cr"]) and h2o["evicts_on"] == "plain"
        assert h2o["realized_cr"] == pytest.approx(window / h2o["budget"])
        assert rows[(f"tova@{cr}", "nominal")]["budget"] == window // cr
    assert rows[("gqa@4", None)]["realized_cr"] == 4 and rows[("gqa@4", None)]["kv_heads"] == 1
    assert [g["status"] for g in result["goals"]] and all(g["status"] in ("pass", "fail", "missing")
                                                          for g in result["goals"])
    meta = result["meta"]
    assert meta["from_scratch"]["corpus"]["held_out_files"] > 0 and meta["device"] and meta["commands"]
    markdown = (out / "results.md").read_text()
    for text in ("## Goals", "## Setup", "| dmc@4 | DMC |", "plain continued training", "Skipped or failed:",
                 "perplexity_vs_cr.png", "heads_dmc-8x.png"):
        assert text in markdown
    for name in ("perplexity_vs_cr.png", "heads_dmc-4x.png"):
        assert (out / name).stat().st_size > 1000


def test_held_out_packages_stay_out_of_training(smoke):
    _, root, _, _ = smoke
    work = root / "work" / "data"
    held = [json.loads(line)["path"] for line in (work / "heldout" / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(line)["path"] for f in sorted((work / "train").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    names = {"asyncio", "unittest", "email"}
    assert held and all(p.split("/")[1] in names for p in held)
    assert not any(set(p.split("/")[1:-1]) & (names | {f"test_{n}" for n in names}) for p in train)


def test_a_second_run_redoes_nothing_and_other_settings_are_refused(smoke, capsys):
    study, root, args, _ = smoke
    work = root / "work"
    before = {p: p.stat().st_mtime_ns for p in [*work.glob("study/runs/*/result.json"), work / "base/pretrain.json"]}
    capsys.readouterr()
    assert study.main(args) == 0
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(SystemExit, match="other settings"):
        study.main([*args, "--eval-windows", "3"])


# ------------------------------------------------------------------------------ streaming evaluation
@pytest.fixture(scope="module")
def tiny():
    rng = random.Random(0)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
    texts = [" ".join(f"{word()} = {word()}" for _ in range(60)) + "\n" for _ in range(8)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    return tokenizer, texts


def test_streaming_matches_the_parallel_forward_when_nothing_is_evicted(tiny):
    tokenizer, texts = tiny
    windows = {"seq_len": 48, "max_windows": 5}
    model = dmc_model("llama", vocab_size=len(tokenizer))  # merges happen: DMC's cache equals its full form
    full = perplexity(model, tokenizer, texts, mode="full", **windows)
    streamed = streaming_perplexity(model, tokenizer, texts, lambda n: dmc.DMCCache(model.config), batch_size=2,
                                    **windows)
    assert streamed.loss == pytest.approx(full.loss, rel=1e-5)
    assert streamed.compression.overall_cr == pytest.approx(full.compression.overall_cr)
    model.set_dmc_mode(vanilla=True)
    vanilla = perplexity(model, tokenizer, texts, mode="full", **windows)
    roomy = streaming_perplexity(model, tokenizer, texts,
                                 lambda n: EvictionCache(model.config, EvictionPolicy("h2o", budget=n)), **windows)
    assert roomy.loss == pytest.approx(vanilla.loss, rel=1e-5) and roomy.compression.overall_cr == 1


def _evicting(tokenizer, method: str, budget: int):
    """A tiny model in vanilla mode and a streaming cache factory with a fixed eviction budget."""
    model = dmc_model("llama", vocab_size=len(tokenizer))
    model.set_dmc_mode(vanilla=True)
    return model, lambda n: EvictionCache(model.config, EvictionPolicy(method, budget=budget))


@pytest.mark.parametrize("method", ["h2o", "tova"])
def test_a_prefill_within_the_budget_changes_nothing(tiny, method):
    tokenizer, texts = tiny
    model, cache = _evicting(tokenizer, method, budget=12)
    windows = {"seq_len": 48, "max_windows": 4, "batch_size": 2}
    one_by_one = streaming_perplexity(model, tokenizer, texts, cache, prefill=1, **windows)
    prefilled = streaming_perplexity(model, tokenizer, texts, cache, **windows)  # default: the budget
    assert prefilled.loss == pytest.approx(one_by_one.loss, rel=1e-5)
    assert one_by_one.compression.overall_cr == pytest.approx(4.0)


def test_streaming_recall_answers_like_generate(tiny):
    """Left-padded batches streamed one token at a time give generate()'s greedy answers."""
    tokenizer, _ = tiny
    model = dmc_model("llama", vocab_size=len(tokenizer))
    rng = random.Random(0)
    expected = []
    with torch.no_grad():
        for _ in range(6):
            prompt, answer = make_trial(rng, 5)
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            want = len(tokenizer(answer, add_special_tokens=False).input_ids)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=want, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    result = streaming_recall_probe(model, tokenizer, lambda n: dmc.DMCCache(model.config), pairs=5, trials=6,
                                    batch_size=4, prefill=1)
    assert result["outputs"] == expected and result["trials"] == 6
    with pytest.raises(ValueError, match="DMC families"):
        streaming_recall_probe(torch.nn.Linear(2, 2), tokenizer, lambda n: None)


@pytest.mark.parametrize("method", ["h2o", "tova"])
def test_streaming_recall_through_eviction_does_not_depend_on_batching(tiny, method):
    """Left padding (rows whose first chunk is all padding too) leaves each row's eviction alone."""
    tokenizer, _ = tiny
    model, cache = _evicting(tokenizer, method, budget=8)
    alone = streaming_recall_probe(model, tokenizer, cache, pairs=5, trials=5, batch_size=1)
    batched = streaming_recall_probe(model, tokenizer, cache, pairs=5, trials=5, batch_size=5)
    assert batched["outputs"] == alone["outputs"]
