"""Choices of one prompt from one prefill (``LLM.add_request(..., fork_of=)``, the server's ``n``): the prompt is
prefilled once and its cache row copied; the choices equal separate requests (greedy, and seeded samples), for
bounded, unbounded and delayed-merging windows, and fall back to their own prefill when they cannot fork."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, dmc_model

import dmc

MODELS = {"dmc-w4": dict(window=4), "dmc-unbounded": dict(window=None), "delay-3": dict(window=4, merge_delay=3)}


def _engine(name: str, **kw) -> dmc.LLM:
    kw = {"device": "cpu", "max_model_len": 128, "max_num_seqs": 8, "progress": False, **kw}
    return dmc.LLM(dmc_model("llama", **MODELS[name]), **kw)


def _count_prefill(llm) -> list[int]:
    """Record the tokens of every prefill forward of ``llm``."""
    tokens: list[int] = []
    inner = llm.runner.prefill_batch

    def prefill_batch(rows, chunks, seen, **kw):
        tokens.append(sum(len(c) for c in chunks))
        return inner(rows, chunks, seen, **kw)

    llm.runner.prefill_batch = prefill_batch
    return tokens


def _run(llm, prompt, params: list[dmc.SamplingParams], fork: bool) -> list:
    first = llm.add_request(prompt, params[0])
    requests = [first] + [llm.add_request(prompt, p, fork_of=first if fork else None) for p in params[1:]]
    while llm.has_unfinished():
        llm.step()
    return [llm._output(r) for r in requests]


def _assert_no_leak(llm):
    assert llm.cache.free_page_count() == llm.initial_free_pages
    assert llm.cache.free_row_count() == llm.cache.layout.max_seqs
    assert not llm.scheduler.running and not llm.scheduler.waiting and not llm._forks


@pytest.mark.parametrize("name", list(MODELS))
def test_n_choices_prefill_once_and_equal_separate_requests(name):
    prompt = torch.randint(1, VOCAB, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = [dmc.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)] * 4
    sampled = [dmc.SamplingParams(max_tokens=12, temperature=1.0, seed=10 + j, ignore_eos=True) for j in range(4)]
    llm = _engine(name, prefill_chunk=16)  # the prompt takes three steps: the forks wait for the last
    tokens = _count_prefill(llm)
    for params in (greedy, sampled):
        tokens.clear()
        forked = _run(llm, prompt, params, fork=True)
        assert sum(tokens) == len(prompt)  # one prefill for the four choices
        tokens.clear()
        alone = _run(llm, prompt, params, fork=False)
        assert sum(tokens) == 4 * len(prompt)
        for a, b in zip(forked, alone):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert a.compression["slots"] == b.compression["slots"]
        if params is greedy:
            assert len({tuple(o.token_ids) for o in forked}) == 1
            for a, b in zip(forked, alone):
                assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-4)
                assert [e and e.logprob for e in a.prompt_logprobs[1:]] == pytest.approx(
                    [e.logprob for e in b.prompt_logprobs[1:]], abs=1e-4)
        else:
            assert len({tuple(o.token_ids) for o in forked}) > 1  # each choice its own seed
    _assert_no_leak(llm)


def test_forks_that_do_not_fit_or_lose_their_parent_prefill_themselves():
    prompt = list(range(1, 30))
    params = dmc.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = _engine("dmc-w4", max_num_seqs=2)  # room for the parent and one fork: the others queue
    tokens = _count_prefill(llm)
    outs = _run(llm, prompt, [params] * 4, fork=True)
    assert len({tuple(o.token_ids) for o in outs}) == 1 and all(o.finish_reason == "length" for o in outs)
    assert sum(tokens) == 3 * len(prompt)  # the parent's prefill (with one fork), then the two that waited
    _assert_no_leak(llm)

    parent = llm.add_request(prompt, params)
    fork = llm.add_request(prompt, params, fork_of=parent)
    llm.abort(parent)  # before its prefill: the fork runs on its own
    while llm.has_unfinished():
        llm.step()
    assert parent.finish_reason == "aborted" and fork.finish_reason == "length"
    assert fork.output_ids == outs[0].token_ids
    held = llm.add_request(prompt, params, fork_of=llm.add_request(prompt, params))
    assert llm.abort(held.id) and held.finish_reason == "aborted"
    while llm.has_unfinished():
        llm.step()
    _assert_no_leak(llm)


def test_server_n_prefills_the_prompt_once(tmp_path):
    """``n: 4`` over HTTP: one prefill of the prompt; greedy choices equal a lone request's, seeded ones the lone
    requests of seeds seed + j (the server's seeds per choice, as before forking)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import asyncio

    from test_serve import build_model_dir
    from transformers import AutoTokenizer

    from dmc.serve import EngineLoop, Metrics, ServerConfig, build_app

    model_dir = build_model_dir(tmp_path / "tiny")
    llm = dmc.LLM(model_dir, device="cpu", max_model_len=256, max_num_seqs=8, progress=False, cuda_graphs=False)
    tokens = _count_prefill(llm)
    engine = EngineLoop(lambda: llm, Metrics("m"))
    engine.start()
    config = ServerConfig(model_name="m", tokenizer=AutoTokenizer.from_pretrained(model_dir), max_model_len=256,
                          vocab_size=engine.info["vocab_size"])
    app = build_app(engine, config)
    body = {"model": "m", "prompt": "def f(x):\n    return x", "max_tokens": 10, "ignore_eos": True}
    prompt_len = len(config.tokenizer(body["prompt"])["input_ids"])

    async def completions(c, **kw) -> list[list[int]]:
        out = (await c.post("/v1/completions", json={**body, **kw})).json()
        return [choice["token_ids"] for choice in sorted(out["choices"], key=lambda ch: ch["index"])]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tokens.clear()
            greedy = await completions(c, n=4, temperature=0)
            assert sum(tokens) == prompt_len
            assert greedy == [(await completions(c, temperature=0))[0]] * 4
            tokens.clear()
            seeded = await completions(c, n=4, temperature=1.0, seed=7)
            assert sum(tokens) == prompt_len
            assert len(set(map(tuple, seeded))) > 1
            assert seeded == [(await completions(c, temperature=1.0, seed=7 + j))[0] for j in range(4)]

    try:
        asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        engine.stop()
    _assert_no_leak(llm)
