"""The quality study (experiments/quality_study.py, issue #5): the smoke pipeline end to end on the
CPU, the structure of what it writes, idempotent re-runs and the stage deadline; and the streaming
evaluation it uses for the eviction baselines (dmc.eval.streaming)."""

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
    """One smoke run of every stage (tiny model, few steps), CR 4 and 8 and GQA 4x to keep it short."""
    root = tmp_path_factory.mktemp("quality")
    study = _study()
    args = ["--smoke", "--work", str(root / "work"), "--out", str(root / "docs"), "--crs", "4", "8",
            "--gqa-ratios", "4"]
    status = study.main(["--stage", "all", *args])
    return study, root, args, status


def test_smoke_pipeline_writes_the_report(smoke):
    _, root, _, status = smoke
    assert status == 0
    result = json.loads((root / "docs" / "results" / "quality.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"vanilla", "vanilla-extra", "dmc-4x", "dmc-8x", "gqa-4x", "gqa-4x-pooled",
                         "h2o-4x", "h2o-8x", "tova-4x", "tova-8x"}
    for row in rows.values():
        for key in ("method", "label", "target_cr", "realized_cr", "perplexity", "loss", "recall_accuracy",
                    "tokens_pretrain", "tokens_extra", "tokens_total"):
            assert key in row, (row["name"], key)
        assert row["perplexity"] > 1 and 0 <= row["recall_accuracy"] <= 1
        assert row["tokens_total"] == row["tokens_pretrain"] + row["tokens_extra"]
    plan = result["meta"]["extra_training_plan"]
    assert rows["dmc-4x"]["tokens_extra"] == rows["gqa-4x"]["tokens_extra"] == rows["vanilla-extra"]["tokens_extra"] \
        == plan["tokens"] > 0 and rows["vanilla"]["tokens_extra"] == 0
    assert plan["zero_out_steps"] + plan["retrofit_steps"] + plan["finetune_steps"] == plan["steps"]
    # DMC: the compressed cache reproduces the full-sequence forward
    check = rows["dmc-8x"]["cache_check"]
    assert check["relative_gap"] < 1e-4 and check["cr_cache"] == pytest.approx(check["cr_full"], rel=1e-6)
    assert len(rows["dmc-8x"]["compression"]["per_head_cr"]) == result["meta"]["model"]["layers"]
    assert rows["dmc-8x"]["perplexity_relaxed"] > 1 and rows["dmc-8x"]["train"]["val_loss_relaxed"] > 0
    # eviction: budget matched to DMC's realized CR at the same target, and kept
    for cr in (4, 8):
        h2o = rows[f"h2o-{cr}x"]
        assert h2o["matched_cr"] == pytest.approx(rows[f"dmc-{cr}x"]["realized_cr"])
        assert h2o["budget"] == -(-result["meta"]["model"]["seq_len"] // h2o["matched_cr"])
        assert h2o["realized_cr"] == pytest.approx(result["meta"]["model"]["seq_len"] / h2o["budget"])
    assert rows["gqa-4x"]["realized_cr"] == 4 and rows["gqa-4x"]["kv_heads"] == 1
    assert [g["status"] for g in result["goals"]] and all(g["status"] in ("pass", "fail") for g in result["goals"])
    meta = result["meta"]
    assert meta["held_out_packages"] and meta["data"]["held_out_files"] > 0 and meta["device"]
    assert meta["pretraining"]["tokens"] > 0 and meta["commands"]
    markdown = (root / "docs" / "results.md").read_text()
    for text in ("## Goals", "## Results", "DMC 4x", "TOVA 8x", "vanilla + same extra tokens",
                 "results/quality_ppl_vs_cr.png", "results/quality_heatmap_dmc-8x.png"):
        assert text in markdown
    for name in ("quality_ppl_vs_cr.png", "quality_recall_vs_cr.png", "quality_heatmap_dmc-4x.png"):
        assert (root / "docs" / "results" / name).stat().st_size > 1000


def test_held_out_packages_stay_out_of_training(smoke):
    _, root, _, _ = smoke
    work = root / "work" / "data"
    held = [json.loads(line)["path"] for line in (work / "heldout" / "heldout.jsonl").read_text().splitlines()]
    train = [json.loads(line)["path"] for f in sorted((work / "train").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    names = {"asyncio", "unittest", "email"}
    assert held and all(p.split("/")[1] in names for p in held)
    assert not any(set(p.split("/")[1:-1]) & (names | {f"test_{n}" for n in names}) for p in train)


def test_stages_are_idempotent_and_stop_at_the_deadline(smoke):
    study, root, args, _ = smoke
    work = root / "work"
    rows_before = {p.name: p.stat().st_mtime_ns for p in (work / "rows").glob("*.json")}
    assert study.main(["--stage", "dmc", *args]) == 0  # everything found: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (work / "rows").glob("*.json")} == rows_before
    (work / "rows" / "gqa-4x.json").unlink()
    import shutil
    shutil.rmtree(work / "runs" / "gqa-4x")
    assert study.main(["--stage", "gqa", "--stage-minutes", "0.01", *args]) == study.EXIT_DEADLINE
    runs = json.loads((work / "commands.json").read_text())["runs"]
    assert runs[-1]["stage"] == "gqa" and runs[-1]["status"] == "stopped at the deadline"
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--stage", "report", *args, "--eval-windows", "3"])


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


def test_deadline_found_behind_a_wrapping_error():
    """The alarm can fire inside torch.compile, which raises it again wrapped (as InductorError):
    the stage must still stop with the resumable status, and other errors must still raise."""
    study = _study()
    deadline = study.StageDeadline("deadline reached during a run")
    try:
        try:
            raise deadline
        except study.StageDeadline as e:
            raise RuntimeError("InductorError: StageDeadline") from e
    except RuntimeError as wrapped:
        assert study.deadline_in(wrapped) is deadline
    assert study.deadline_in(ValueError("unrelated")) is None
