"""Log-probabilities from the engine (SamplingParams.logprobs / prompt_logprobs): the HF model's distribution
for a plain model, ``dmc eval``'s per-token loss for a DMC one (through the compressed cache), in batches and
chunked prefill, one host copy per step."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, dmc_model, stock_model

import dmc
from dmc.engine.params import SamplingParams
from dmc.eval.perplexity import perplexity
from dmc.tiny import train_tokenizer

TEXT = "the cat sat on the mat and the dog ran in the park, one two three four five six seven"


def _prompts(lengths=(13, 5, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _reference(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's logits after every token ``[n, V]`` (full sequence, fp32)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), dim=-1)


def _check(entry, ref_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(ref_row[token]), abs=1e-4)
    top = ref_row.topk(k)
    assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert len(entry.top) == k


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    model = stock_model("llama")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("prefill_chunk", [4096, 7])  # whole prompts in one forward; chunks over several steps
def test_plain_model_logprobs_equal_hf(plain, prefill_chunk):
    model, path = plain
    llm = dmc.LLM(path, device="cpu", max_model_len=128, max_num_seqs=4, progress=False, prefill_chunk=prefill_chunk)
    prompts = _prompts()
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2),
              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),  # shares the batch, asks for nothing
              SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True, logprobs=0, prompt_logprobs=0)]
    outs = llm.generate(prompts, params)
    assert outs[1].logprobs is None and outs[1].prompt_logprobs is None
    for out, prompt, p in zip(outs, prompts, params):
        if p.logprobs is None:
            continue
        ref = _reference(model, prompt + out.token_ids)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for t in range(1, len(prompt)):
            _check(out.prompt_logprobs[t], ref[t - 1], prompt[t], p.prompt_logprobs)
        assert len(out.logprobs) == len(out.token_ids)
        for i, token in enumerate(out.token_ids):
            _check(out.logprobs[i], ref[len(prompt) - 1 + i], token, p.logprobs)
        if p.temperature == 0:  # greedy: the chosen token is the most likely one
            assert all(e.top[0][0] == e.token_id for e in out.logprobs)


def test_scoring_only_with_max_tokens_zero(plain):
    model, path = plain
    llm = dmc.LLM(path, device="cpu", max_model_len=128, max_num_seqs=4, progress=False, prefill_chunk=8)
    prompt = _prompts((20,))[0]
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert out.finish_reason == "length" and out.token_ids == [] and out.finished
    ref = _reference(model, prompt)
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))], abs=1e-4)
    assert llm.cache.free_page_count() == llm.initial_free_pages


@pytest.mark.parametrize("prefill_chunk", [4096, 9])
def test_dmc_prompt_logprobs_equal_dmc_eval_loss(prefill_chunk):
    tokenizer = train_tokenizer([TEXT] * 5, vocab_size=120)
    model = dmc_model("llama", vocab_size=len(tokenizer))
    ids = tokenizer(TEXT).input_ids
    result = perplexity(model, tokenizer, [TEXT], seq_len=len(ids))  # `dmc eval`'s loss of this text
    llm = dmc.LLM(model, device="cpu", max_model_len=128, max_num_seqs=4, progress=False, prefill_chunk=prefill_chunk)
    (out,) = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
    scores = [e.logprob for e in out.prompt_logprobs[1:]]
    assert -sum(scores) / len(scores) == pytest.approx(result.loss, abs=1e-4)
    assert out.compression["cr"] > 1.2  # it went through a compressed cache


def test_stream_carries_new_logprobs(plain):
    _, path = plain
    llm = dmc.LLM(path, device="cpu", max_model_len=128, max_num_seqs=4, progress=False)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
    got = []
    for update in llm.stream([_prompts((6,))[0]], params):
        assert len(update.new_logprobs) == len(update.new_token_ids)
        got += update.new_logprobs
    assert [e.token_id for e in got] == update.token_ids
    assert got == update.logprobs


def test_bad_logprobs_are_refused_with_the_field_named(plain):
    _, path = plain
    llm = dmc.LLM(path, device="cpu", max_model_len=128, max_num_seqs=4, progress=False)
    for params, field in ((SamplingParams(logprobs=-1), "logprobs"), (SamplingParams(prompt_logprobs=1.5),
                          "prompt_logprobs"), (SamplingParams(max_tokens=0), "max_tokens=0"),
                          (SamplingParams(logprobs=VOCAB + 1), "vocabulary")):
        (out,) = llm.generate([[1, 2, 3]], params)
        assert out.finish_reason == "error" and field in out.error, out.error
