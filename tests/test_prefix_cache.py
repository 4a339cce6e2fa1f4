"""Prefix caching of the compressed state (``LLM(enable_prefix_caching=True)``): a prompt that starts with tokens an
earlier one prefilled starts from a snapshot of the row after them. The outputs equal those without caching (bounded,
unbounded and delayed-merging windows, vanilla), a hit really skips the shared tokens' prefill, snapshots are dropped
least recently used first and give every page back, short prompts are never cached, eviction baselines refuse it."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import VOCAB, dmc_model, stock_model
from test_fork import _count_prefill

import dmc
from dmc.baselines.eviction import EvictionPolicy
from dmc.cli._engine_args import add_engine_arguments, engine_config

MODELS = {"dmc-w4": dict(window=4), "dmc-unbounded": dict(window=None), "delay-3": dict(window=4, merge_delay=3),
          "vanilla": dict(window=4)}
GREEDY = dmc.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _engine(name: str, model=None, **kw) -> dmc.LLM:
    kw = {"device": "cpu", "max_model_len": 512, "max_num_seqs": 4, "progress": False,
          "vanilla": name == "vanilla", **kw}
    return dmc.LLM(model if model is not None else dmc_model("llama", **MODELS[name]), **kw)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _chat(llm, turns: int = 4) -> list[list[int]]:
    """A chat: a system prompt, then each turn resends the history (prompt and reply) plus a new message; two chats
    share the system prompt and run side by side. Returns every reply."""
    system, replies = _ids(100, 0), []
    histories = [system + _ids(30, 1), system + _ids(45, 2)]
    for turn in range(turns):
        outputs = llm.generate(histories, GREEDY)
        replies += [o.token_ids for o in outputs]
        histories = [h + o.token_ids + _ids(25 + 7 * turn, 10 * turn + j)
                     for j, (h, o) in enumerate(zip(histories, outputs))]
    return replies


def _assert_all_free(llm) -> None:
    assert not llm.has_unfinished()
    llm.clear_prefix_cache()
    assert llm.cache.free_page_count() == llm.initial_free_pages
    assert llm.cache.free_row_count() == llm.cache.layout.max_seqs


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunk", [4096, 48])
def test_multi_turn_outputs_equal_without_caching(name, chunk):
    model = dmc_model("llama", **MODELS[name])
    reference = _chat(_engine(name, model, prefill_chunk=chunk))
    llm = _engine(name, model, prefill_chunk=chunk, enable_prefix_caching=True)
    assert _chat(llm) == reference
    stats = llm.prefix_cache_stats()
    assert stats["hits"] >= 6 and stats["reused_tokens"] >= 6 * 128 and 0 < stats["hit_rate"] < 1
    _assert_all_free(llm)


def test_a_hit_skips_the_shared_prefill():
    llm = _engine("dmc-w4", enable_prefix_caching=True)
    tokens = _count_prefill(llm)
    first = _ids(150, 0)
    llm.generate([first], GREEDY)
    assert sum(tokens) == 150 and tokens[0] == 128  # cut at the block boundary, the row copied there
    tokens.clear()
    llm.generate([first + _ids(20, 1)], GREEDY)
    assert sum(tokens) == 170 - 128
    stats = llm.prefix_cache_stats()
    assert (stats["queries"], stats["hits"], stats["reused_tokens"], stats["queried_tokens"]) == (2, 1, 128, 320)
    # a request asking for prompt log-probs needs every position's logits: it prefills all of its prompt
    tokens.clear()
    llm.generate([first + _ids(20, 1)], dmc.SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))
    assert sum(tokens) == 170
    _assert_all_free(llm)


def test_a_prompt_shorter_than_a_block_and_one_token_is_never_cached():
    llm = _engine("dmc-w4", enable_prefix_caching=True)
    llm.generate([_ids(n, n) for n in (10, 63, 64)], GREEDY)
    assert llm.prefix_cache_stats()["parked"] == 0 and llm.prefix_cache_stats()["snapshots"] == 0
    llm.generate([_ids(65, 65)], GREEDY)  # 64 tokens and one to give the first token's logits
    assert llm.prefix_cache_stats()["snapshots"] == 1


def test_snapshots_are_evicted_least_recently_used_first():
    llm = _engine("dmc-w4", max_num_seqs=3, enable_prefix_caching=True)
    a, b, c = _ids(100, 1), _ids(100, 2), _ids(100, 3)
    llm.generate([a], GREEDY)
    llm.generate([b], GREEDY)
    llm.generate([a], GREEDY)  # a hit: a's snapshot is now the most recently used
    assert llm.prefix_cache_stats()["snapshots"] == 2
    llm.generate([c], GREEDY)  # its row is the last free one: b's snapshot goes for c's
    held = {s.tokens for s in llm.prefix_cache.snapshots.values()}
    assert held == {tuple(a[:64]), tuple(c[:64])}
    assert llm.prefix_cache_stats()["evicted"] == 1
    _assert_all_free(llm)


def test_snapshots_give_their_pages_to_requests():
    """A pool that holds few snapshots: they are evicted for the pages the requests need, outputs unchanged."""
    model = dmc_model("llama", window=4)
    kw = dict(kv_cache_memory=200 * 2048 + 40000, max_num_seqs=4, max_model_len=256)  # 210 pages of 2 KiB
    prompts = [_ids(140, seed) for seed in range(6)]
    reference = [o.token_ids for o in _engine("dmc-w4", model, **kw).generate(prompts, GREEDY)]
    llm = _engine("dmc-w4", model, enable_prefix_caching=True, **kw)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference
    assert llm.prefix_cache_stats()["evicted"] > 0
    _assert_all_free(llm)


def test_refused_with_eviction_baselines_and_forced_decisions():
    policy = EvictionPolicy("tova", budget=32)
    with pytest.raises(ValueError, match="eviction baselines"):
        dmc.LLM(dmc.convert(stock_model("llama")), device="cpu", max_model_len=128, progress=False, eviction=policy,
                vanilla=True, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="forced_period"):
        _engine("dmc-w4", forced_period=4, enable_prefix_caching=True)
    assert _engine("dmc-w4").prefix_cache_stats() is None  # off by default


def test_cli_flag(tmp_path):
    dmc_model("llama").save_pretrained(tmp_path)
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config(parser.parse_args([str(tmp_path)])).enable_prefix_caching is False
    assert engine_config(parser.parse_args([str(tmp_path), "--enable-prefix-caching"])).enable_prefix_caching


def test_server_metrics_and_health_report_the_prefix_cache():
    pytest.importorskip("prometheus_client")
    from dmc.serve import Metrics
    from dmc.serve.engine_core import EngineCore, Submission

    llm = _engine("dmc-w4", enable_prefix_caching=True)
    prompt = _ids(100, 0)
    pending = [[("add", [Submission(key=2, prompt_ids=prompt + [7, 8], params=GREEDY)])],
               [("add", [Submission(key=1, prompt_ids=prompt, params=GREEDY)])]]
    messages = []

    def receive(block: bool) -> list:
        if not llm.has_unfinished():
            return pending.pop() if pending else [("stop", None)]
        return []

    EngineCore(llm, receive, messages.append).run()
    stats = messages[-1].prefix_cache
    assert stats == llm.prefix_cache_stats() and stats["hits"] == 1 and stats["reused_tokens"] == 64
    metrics = Metrics("m")
    metrics.set_prefix_cache(stats)
    metrics.set_prefix_cache(stats)  # running totals: counted once
    text = metrics.render().decode()
    assert 'dmc_prefix_cache_hits_total{model="m"} 64.0' in text
    assert 'dmc_prefix_cache_queries_total{model="m"} 202.0' in text
    assert 'dmc_prefix_cache_snapshots{model="m"} 1.0' in text


def test_a_preempted_request_is_recomputed_and_may_hit():
    """An optimistic admission (margin -0.6) runs out of pages while decoding: a request is preempted, its
    recompute goes through the prefix cache like any admission, the outputs are unchanged."""
    model = dmc_model("llama", window=4)
    params = dmc.SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    kw = dict(kv_cache_memory=200 * 2048 + 40000, max_num_seqs=4, max_model_len=256, admission_margin=-0.6)
    prompts = [_ids(130, 0) + _ids(10, seed) for seed in range(5)]
    reference = [o.token_ids for o in _engine("dmc-w4", model, **kw).generate(prompts, params)]
    llm = _engine("dmc-w4", model, enable_prefix_caching=True, **kw)
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == reference
    assert sum(o.num_preemptions for o in outputs) > 0 and llm.prefix_cache_stats()["hits"] > 0
    _assert_all_free(llm)
