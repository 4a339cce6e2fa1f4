"""RULER-style tasks: the generators (answer in the haystack, exact lengths and depths), the scoring,
and runs through DMC's cache, a plain model and an eviction cache on tiny random models."""

import math
import random

import pytest
import torch
from conftest import dmc_model, stock_model

import dmc
from dmc.baselines import EvictionCache, EvictionPolicy
from dmc.eval.ruler import (NIAH_INTRO, TASKS, VT_INTRO, _special_prefix, check_ruler, haystack_ids, make_ruler_trial,
                            make_ruler_trials, ruler_eval, score)
from dmc.tiny import train_tokenizer

TEXTS = ["def f(x):\n    return x * 2 + 1\n" * 40, "class A:\n    value = 3\n    name = 'a'\n" * 40,
         "One of the special magic numbers for VAR is: 0123456789. What are all the variables assigned?\n" * 10,
         (NIAH_INTRO + VT_INTRO + "mentioned in the provided text? The special magic number for is: Question: Find all "
          "variables that are assigned the value in the text above. Answer: According to the chain(s) of variable "
          "assignment in the text above, variables are assigned the value, they are:\n") * 10]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=600)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length,depth", [(256, 0.0), (300, 0.5), (512, 1.0)])
def test_trials_have_the_length_and_hold_their_answers(tokenizer, task, length, depth):
    rng = random.Random(0)
    haystack = haystack_ids(tokenizer, TEXTS[:2], 2 * length)
    trial = make_ruler_trial(tokenizer, task, length, depth, rng, haystack, needles=3)
    assert len(trial.input_ids) == length and trial.task == task
    text = tokenizer.decode(trial.input_ids)
    needles = [tokenizer.decode(trial.input_ids[a:b]) for a, b in trial.needle_spans]
    assert len(trial.answers) == (3 if task in ("niah_multivalue", "variable_tracking") else 1)
    for answer in trial.answers:  # every answer is in a needle, and the needles are in the prompt
        assert any(answer in needle for needle in needles) and answer in text
    # the needles start at the depth of the haystack: right after the intro at 0, before the question at 1
    intro = NIAH_INTRO if task.startswith("niah") else VT_INTRO
    head = len(_special_prefix(tokenizer)) + len(tokenizer(intro, add_special_tokens=False).input_ids)
    spans = trial.needle_spans
    if depth == 0.0:
        assert spans[0][0] == head
    if depth == 1.0:  # all at the end of the haystack, one after the other, then the question
        assert all(a == b for (_, b), (a, _) in zip(spans, spans[1:]))
        assert tokenizer.decode(trial.input_ids[spans[-1][1]:]).lstrip().startswith(("What", "Question"))
    if depth == 0.5:
        assert head < spans[0][0] < length // 2 + 10


def test_variable_tracking_chains_resolve_to_the_answers(tokenizer):
    trial = make_ruler_trial(tokenizer, "variable_tracking", 400, 0.3, random.Random(1),
                             haystack_ids(tokenizer, None, 800), needles=4)
    needles = [tokenizer.decode(trial.input_ids[a:b]).strip() for a, b in trial.needle_spans]
    values: dict[str, str] = {}
    for line in needles:  # "VAR B = A." in order: each name is defined before it is used
        name, _, source = line[len("VAR "):-1].partition(" = ")
        values[name] = source if source.isdigit() else values[source]
    asked = tokenizer.decode(trial.input_ids).split("assigned the value ")[1].split()[0]
    assert sorted(n for n, v in values.items() if v == asked) == sorted(trial.answers) and len(values) == 8


def test_trials_repeat_for_a_seed_and_settings_are_checked(tokenizer):
    a = make_ruler_trials(tokenizer, TEXTS, lengths=[256, 384], depths=[0.2, 0.8], trials=2, seed=3, needles=2)
    b = make_ruler_trials(tokenizer, TEXTS, lengths=[256, 384], depths=[0.2, 0.8], trials=2, seed=3, needles=2)
    assert len(a) == 2 * len(TASKS) * 2 * 2 and [t.input_ids for t in a] == [t.input_ids for t in b]
    assert {len(t.input_ids) for t in a} == {256, 384}
    for bad, message in (((["nope"], [128], [0.5], 1), "unknown RULER task"), ((TASKS, [16], [0.5], 1), ">= 64"),
                         ((TASKS, [128], [1.5], 1), "within 0"), ((TASKS, [128], [0.5], 0), ">= 1")):
        with pytest.raises(ValueError, match=message):
            check_ruler(*bad)
    with pytest.raises(ValueError, match="no room"):
        make_ruler_trial(tokenizer, "niah_multikey", 64, 0.5, random.Random(0), haystack_ids(tokenizer, None, 64),
                         needles=8)


def test_scoring_is_exact_match():
    assert score(" 1234567.", ["1234567"]) and score("1234567\nmore", ["1234567"])
    assert not score(" 123456", ["1234567"]) and not score(" 12345678", ["1234567"]) and not score("", ["1"])
    assert score(" 22, 11, 33 and more", ["11", "22", "33"]) and not score(" 11, 22", ["11", "22", "33"])
    assert not score(" 11, 22, 44", ["11", "22", "33"])


def test_ruler_eval_through_dmc_plain_and_eviction_caches(tokenizer, monkeypatch):
    trials = make_ruler_trials(tokenizer, TEXTS, tasks=["niah_single", "variable_tracking"], lengths=[192],
                               depths=[0.5], trials=3, needles=2)
    model = dmc_model("llama", window=4, vocab_size=600)
    result = ruler_eval(model, tokenizer, trials, batch_size=2)
    assert result["trials"] == 6 and set(result["by_task"]) == {"niah_single", "variable_tracking"}
    assert result["compression"]["192"]["cr"] > 1  # DMC's cache, counted
    # a generation equal to the answer scores: a model that returns it (the scoring path end to end)
    from dmc.eval import ruler

    def oracle(model, tokenizer, ids, new_tokens, cache_factory, prefill):
        answers = [next(t for t in trials if t.input_ids == row.tolist()).answers for row in ids]
        return [tokenizer(" " + ", ".join(a), add_special_tokens=False).input_ids for a in answers], None
    monkeypatch.setattr(ruler, "_generate", oracle)
    assert ruler_eval(model, tokenizer, trials)["accuracy"] == 1.0
    monkeypatch.undo()
    plain = stock_model("llama", vocab_size=600).eval()
    assert ruler_eval(plain, tokenizer, trials)["compression"] == {}  # full attention: nothing counted
    vanilla = dmc.convert(plain)
    vanilla.set_dmc_mode(vanilla=True)
    policy = EvictionPolicy("snapkv", budget=32, window=8)
    evicted = ruler_eval(vanilla, tokenizer, trials, cache_factory=lambda n: EvictionCache(vanilla.config, policy))
    assert evicted["compression"]["192"]["slots"] > 0
    assert evicted["compression"]["192"]["cr"] == pytest.approx((192 + 5) / 32, rel=0.2)
    whole = ruler_eval(vanilla, tokenizer, trials, cache_factory=lambda n: EvictionCache(vanilla.config, policy),
                       prefill=192)
    assert whole["trials"] == 6


# --------------------------------------------------------------------------- dmc eval
@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ruler")
    dmc_model("llama", window=4, vocab_size=600).save_pretrained(root / "dmc")
    stock_model("llama", vocab_size=600).save_pretrained(root / "original")
    for name in ("dmc", "original"):
        tokenizer.save_pretrained(root / name)
    (root / "data").mkdir()
    for i, text in enumerate(TEXTS):
        (root / "data" / f"{i}.txt").write_text(text)
    return root


def test_dmc_eval_runs_ruler_baselines_and_several_windows(dirs, capsys):
    import json

    from dmc.cli.main import main
    out = dirs / "report.json"
    assert main(["eval", str(dirs / "dmc"), "--data", str(dirs / "data"), "--seq-len", "32", "64", "--max-windows",
                 "2", "--recall-pairs", "0", "--ruler-lengths", "256", "320", "--ruler-tasks", "niah_single",
                 "variable_tracking", "--ruler-depths", "0.5", "--ruler-trials", "2", "--baselines", "snapkv", "h2o",
                 "--baseline-model", str(dirs / "original"), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity at 64 tokens" in printed and "RULER (snapkv at DMC's" in printed
    report = json.loads(out.read_text())
    assert report["complete"] and report["seq_len"] == 32 and report["seq_lens"] == [32, 64]
    assert report["by_seq_len"]["64"]["realized_cr"] > 1 and report["by_seq_len"]["64"]["windows"] >= 1
    ruler = report["ruler"]
    assert ruler["trials"] == 2 * 2 * 2 and set(ruler["by_task"]["niah_single"]) == {"256", "320"}
    for method in ("snapkv", "h2o"):
        for length in ("256", "320"):
            row = report["ruler_baselines"][method][length]
            assert row["budget"] == math.ceil(int(length) / ruler["compression"][length]["cr"])
            assert row["trials"] == 4 and 0 <= row["accuracy"] <= 1
    assert report["ruler_baselines"]["evicts_on"] == str(dirs / "original")


@pytest.mark.parametrize("args,message", [
    (["--baselines", "tova"], "--baselines run the RULER tasks"),
    (["--ruler-lengths", "32"], ">= 64"),
    (["--ruler-lengths", "128", "--ruler-tasks", "nope"], "unknown RULER task"),
    (["--ruler-lengths", "128", "--ruler-depths", "2"], "within 0"),
])
def test_dmc_eval_ruler_errors(dirs, capsys, args, message):
    from dmc.cli.main import main
    assert main(["eval", str(dirs / "dmc"), "--data", str(dirs / "data"), "--seq-len", "32", "--device", "cpu",
                 *args]) == 2
    assert message in capsys.readouterr().err


def test_dmc_eval_baselines_need_a_dmc_model(dirs, capsys):
    from dmc.cli.main import main
    assert main(["eval", str(dirs / "original"), "--data", str(dirs / "data"), "--seq-len", "32", "--device", "cpu",
                 "--recall-pairs", "0", "--ruler-lengths", "128", "--baselines", "tova"]) == 2
    assert "is a plain model" in capsys.readouterr().err
