"""The Triton commit of packed first chunks (dmc.kernels.triton_commit) against its twin, the tensor ops of
dmc.engine.cache.commit_packed: after one batched prefill of new prompts (merges happening, chunks shorter and
longer than the window, delayed merging on and off) every row holds the same slots, window ring and delay ring, and
the engine's greedy tokens are the same. Without a GPU the kernel runs in Triton's interpreter (test_kernels.py)."""

import pytest
import torch
from conftest import dmc_model
from test_batched_prefill import _assert_same_state, _state
from test_engine import GREEDY, _engine, _prompts

pytest.importorskip("triton")
from test_kernels import DEVICE, interpreter  # noqa: E402

LENGTHS = (23, 5, 41, 1, 12, 2)
MODELS = {  # name -> dmc_model kwargs
    "w4": dict(window=4),
    "w12": dict(window=12),
    "delay-3": dict(window=4, merge_delay=3),
    "delay-8-w12": dict(window=12, merge_delay=8),
}


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    with interpreter():
        yield


def _engines(kwargs):
    """Two engines on one model, the tensor ops' and the kernel's (a GPU: on it, fp32; else the interpreter, the
    kernel in the prefill's commit only: the decode step keeps the tensor-op kernels)."""
    model = dmc_model("llama", **kwargs)
    on = {} if DEVICE == "cpu" else dict(device="cuda", dtype=torch.float32, kv_cache_memory=64 * 2**20)
    plain, fused = _engine(model, **on), _engine(model, **on)
    plain.cache.triton, fused.cache.triton = False, True
    assert fused.cache.fused_commit() and not plain.cache.fused_commit()
    return plain, fused


@pytest.mark.parametrize("name", list(MODELS))
def test_the_kernel_leaves_the_rows_of_the_tensor_ops(name):
    plain, fused = _engines(MODELS[name])
    prompts = _prompts(LENGTHS, seed=3)
    states = []
    for llm in (plain, fused):
        requests = [llm.add_request(p, GREEDY) for p in prompts]
        llm._prefill_step()
        assert all(not r.prefilling for r in requests)  # one packed forward held them all
        states.append([_state(llm, r.row, r.seen) for r in requests])
    for a, b in zip(*states):
        _assert_same_state(a, b)
    assert torch.equal(plain.cache.lens, fused.cache.lens)
    assert plain.cache.free_page_count() == fused.cache.free_page_count()
    assert torch.equal(plain.cache.ring_kv, fused.cache.ring_kv) and torch.equal(plain.cache.ring_w, fused.cache.ring_w)


@pytest.mark.parametrize("name", ["w4", "delay-3"])
def test_the_kernel_gives_the_same_tokens(name):
    plain, fused = _engines(MODELS[name])
    prompts = _prompts(LENGTHS, seed=4)
    outs = [[o.token_ids for o in llm.generate(prompts, GREEDY)] for llm in (plain, fused)]
    assert outs[0] == outs[1]
    assert fused.cache.free_page_count() == fused.initial_free_pages
