"""The incremental detokenizer: on random token streams (partial UTF-8 characters, special tokens, stop strings)
its text equals one full decode of the tokens, cut before the first stop string; what it lets a stream show is
never taken back; and the engine (LLM.generate, LLM.stream) gives the same text as a full decode."""

from __future__ import annotations

import os
import random

import pytest

from dmc.engine.detokenizer import Detokenizer
from dmc.tiny import train_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "naïve café — 東京 ünïcödé ✓ 🙂\n", "hello world, the quick brown fox\n"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def full_text(tokenizer, ids, stop=()):
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def run_stream(tokenizer, ids, stop=()):
    """Feed ids one at a time as the engine does; returns (detokenizer, what a stream showed, #tokens fed)."""
    d = Detokenizer(tokenizer, stop)
    shown, out = "", []
    for i, token in enumerate(ids):
        out.append(token)
        d.update(out, final=i == len(ids) - 1)
        end = d.stable_length(finished=i == len(ids) - 1)
        assert d.text.startswith(shown), "text already shown was changed"
        shown += d.text[len(shown):end]
        if d.stopped:
            break
    return d, shown, len(out)


def random_streams(vocab: int, count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        yield [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]


def test_random_streams_equal_a_full_decode(tokenizer):
    vocab = len(tokenizer)
    for ids in random_streams(vocab, 300):
        d, shown, _ = run_stream(tokenizer, ids)
        assert d.text == full_text(tokenizer, ids)
        assert shown == d.text


def test_text_with_multibyte_characters_equals_a_full_decode(tokenizer):
    for text in TEXTS[:3]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        d, shown, _ = run_stream(tokenizer, ids)
        assert d.text == shown == text
    # Byte tokens that split a character: no partial character is shown before the finish.
    ids = tokenizer("🙂東", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tokenizer)
    for i in range(1, len(ids)):
        d.update(ids[:i])
        assert "\ufffd" not in d.text


def test_stop_strings_cut_the_text_and_hold_back_their_start(tokenizer):
    vocab = len(tokenizer)
    stops = ["o w", "\n    ", "fox", "é"]
    hits = 0
    for ids in random_streams(vocab, 200, seed=1):
        full = tokenizer.decode(ids, skip_special_tokens=True)
        d, shown, fed = run_stream(tokenizer, ids, stops)
        assert d.text == full_text(tokenizer, ids, stops)
        assert shown == d.text
        hits += d.stopped
        for s in stops:
            assert s not in d.text
    text = "hello world, the quick brown fox\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d, shown, fed = run_stream(tokenizer, ids, ["quick"])
    assert d.stopped and d.text == shown == "hello world, the "
    assert fed < len(ids)  # it stopped at the token that completed the stop string


def test_holdback_never_shows_a_stop_strings_start(tokenizer):
    d = Detokenizer(tokenizer, ["brown fox"])
    ids = tokenizer("the quick brown", add_special_tokens=False)["input_ids"]
    for i in range(1, len(ids) + 1):
        d.update(ids[:i])
    assert d.text == "the quick brown"
    assert d.stable_length(finished=False) == len("the quick brown") - len("brown fox") + 1
    assert d.stable_length(finished=True) == len(d.text)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    stream = [1] + ids[:2] + [2, 0] + ids[2:] + [2]
    d, shown, _ = run_stream(tokenizer, stream)
    assert d.text == shown == "hello world"


@pytest.mark.parametrize("stop", [[], ["x + 1"]])
def test_engine_text_equals_a_full_decode(tokenizer, stop):
    import dmc
    from dmc.tiny import tiny_llama

    model = dmc.convert(tiny_llama(len(tokenizer), hidden=32), dmc.DMCConfig(window=4))
    llm = dmc.LLM(model, tokenizer=tokenizer, device="cpu", max_model_len=128, max_num_seqs=4, progress=False,
                  cuda_graphs=False)
    params = dmc.SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True, stop=stop)
    prompts = ["def f(x):", "naïve café", "hello"]
    outputs = llm.generate(prompts, params)
    for out in outputs:
        assert out.text == full_text(tokenizer, out.token_ids, stop)
    streamed = {}
    for update in llm.stream(prompts, params):
        streamed[update.request_id] = streamed.get(update.request_id, "") + update.new_text
    assert sorted(streamed.values()) == sorted(o.text for o in outputs)


REAL = os.environ.get("DMC_REAL_TOKENIZER")  # an HF model directory (e.g. SmolLM2 imported from its GGUF)


@pytest.mark.skipif(not REAL, reason="set DMC_REAL_TOKENIZER to a model directory to check a real tokenizer")
def test_real_tokenizer_random_streams_equal_a_full_decode():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(REAL)
    for ids in random_streams(len(tok), 300, seed=2):
        d, shown, _ = run_stream(tok, ids, ["\n\n"])
        assert d.text == shown == full_text(tok, ids, ["\n\n"])
