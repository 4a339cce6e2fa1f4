"""Batched prefill: several requests' chunks in one forward leave every cache row exactly as
prefilling each request alone does (slots, window state, delay ring; spec §7.4), and the engine's steps
(a shared prefill budget, long prompts chunked over several steps) give the tokens of one-at-a-time runs.
Tiny fp32 models with merges happening: DMC (bounded and unbounded windows), vanilla, delayed merging."""

import pytest
import torch
from conftest import dmc_model
from test_engine import GREEDY, _assert_no_leak, _engine, _hf_greedy, _prompts, _row_state

from dmc.engine import runner
from dmc.engine.cache import SequenceView

LENGTHS = (23, 5, 41, 1, 12)
MODELS = {  # name -> (dmc_model kwargs, engine kwargs)
    "dmc-w4": (dict(window=4), {}),
    "dmc-w12": (dict(window=12), {}),
    "dmc-unbounded": (dict(window=None), {}),
    "vanilla": (dict(window=4), dict(vanilla=True)),
    "delay-3": (dict(window=4, merge_delay=3), {}),
    "delay-8": (dict(window=None, merge_delay=8), {}),
}


def _state(llm, row: int, seen: int) -> dict:
    """Everything the cache holds for a row: slot counts (the raw window included), slots, window state
    and the delay ring (as the prefill view exposes it)."""
    lens, keys, values = _row_state(llm, row)
    state = {"slots": llm.cache.slot_counts(row, seen), "keys": keys, "values": values}
    if not llm.cache.layout.vanilla:
        state["window"] = torch.stack([llm.cache.window_prefix(layer, row, seen - llm.cache.raw_held(seen))
                                       for layer in range(llm.cache.layout.num_layers)])
    if llm.cache.layout.delay_width:
        view = SequenceView(llm.cache, row, seen)
        pending = [view.layers[layer].pending for layer in range(llm.cache.layout.num_layers)]
        for name in ("k", "v", "alpha", "importance", "cos", "sin"):
            state[f"pending_{name}"] = torch.stack([p[name] for p in pending])
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a["slots"], b["slots"])
    for name in a:
        if name != "slots":
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=name)


def _alone(model, engine_kw, prompts):
    """Each prompt prefilled alone, whole, through the model's own forward (runner.prefill): its logits
    and the state of its row."""
    llm = _engine(model, **engine_kw)
    out = []
    for prompt in prompts:
        row = llm.cache.open_row()
        logits = llm.runner.prefill(row, prompt, 0)
        out.append((logits, _state(llm, row, len(prompt))))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_prefill_leaves_the_states_of_prefilling_alone(name, monkeypatch):
    """One forward of five prompts of different lengths (1 to 41 tokens), then the same prompts fed in
    uneven chunks over three batched calls (a long prompt continuing beside new ones): every row ends as
    the prompt prefilled alone leaves it, and each chunk's last logits are the same."""
    model_kw, engine_kw = MODELS[name]
    model = dmc_model("qwen2", **model_kw)
    prompts = _prompts(LENGTHS, seed=3)
    alone = _alone(model, engine_kw, prompts)

    packs = _spy_packed(monkeypatch)
    llm = _engine(model, **engine_kw)
    rows = [llm.cache.open_row() for _ in prompts]
    logits = llm.runner.prefill_batch(rows, prompts, [0] * len(prompts))
    delayed = bool(model_kw.get("merge_delay"))
    # five first chunks: one packed group in every layer (the delay ring keeps to the per-chunk path)
    assert packs == ([] if delayed else [[0, 1, 2, 3, 4]] * model.config.num_hidden_layers)
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[i], alone[i][0], atol=1e-4, rtol=1e-4)
        _assert_same_state(_state(llm, rows[i], len(prompt)), alone[i][1])
    merges = 1 - sum(int(s["slots"].sum()) for _, s in alone) / (sum(LENGTHS) * llm.cache.layout.rows)
    assert (merges == 0) if engine_kw.get("vanilla") else (merges > 0.2)

    chunked = _engine(model, **engine_kw)
    rows = [chunked.cache.open_row() for _ in prompts]
    seen = [0] * len(prompts)
    plan = [{0: 10, 2: 3, 3: 1}, {0: 13, 1: 2, 2: 30, 4: 7}, {1: 3, 2: 8, 4: 5}]  # prompt -> tokens this call
    packs.clear()
    for call in plan:
        order = list(call)
        chunks = [prompts[i][seen[i]:seen[i] + call[i]] for i in order]
        logits = chunked.runner.prefill_batch([rows[i] for i in order], chunks, [seen[i] for i in order])
        for i in order:
            seen[i] += call[i]
    assert seen == [len(p) for p in prompts]
    # packed: all three chunks of the first call; in the second, the first chunks of prompts 1 and 4 (segments
    # 1 and 3, not adjacent) while prompts 0 and 2 go on alone; nothing in the third
    layers = model.config.num_hidden_layers
    assert packs == ([] if delayed else [[0, 1, 2]] * layers + [[1, 3]] * layers)
    for i, prompt in enumerate(prompts):
        _assert_same_state(_state(chunked, rows[i], len(prompt)), alone[i][1])
    for j, i in enumerate(plan[-1]):  # the last call ended prompts 1, 2 and 4
        torch.testing.assert_close(logits[j], alone[i][0], atol=1e-4, rtol=1e-4)


def _spy_packed(monkeypatch) -> list[list[int]]:
    """Record, for every layer's packed write of first chunks, the segments it wrote (``PackedChunks.members``)."""
    calls: list[list[int]] = []
    inner = runner.commit_packed

    def commit_packed(views, packed, *args):
        calls.append(list(packed.members))
        return inner(views, packed, *args)

    monkeypatch.setattr(runner, "commit_packed", commit_packed)
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton pooling and FlexAttention need CUDA")
@pytest.mark.parametrize("name", ["dmc-w4", "dmc-w12", "dmc-unbounded", "vanilla"])
def test_gpu_packed_first_chunks_leave_the_states_of_prefilling_alone(name, monkeypatch):
    """On CUDA the packed first chunks take the Triton pooling and FlexAttention with a document mask
    (padded to a bucket); prefilling alone takes FlexAttention per chunk: the same logits and cache rows."""
    model_kw, engine_kw = MODELS[name]
    model = dmc_model("llama", **model_kw).cuda()
    engine_kw = dict(device="cuda", dtype=torch.float32, kv_cache_memory=64 * 2**20, **engine_kw)
    prompts = _prompts((23, 5, 41, 1, 12, 70), seed=4)
    alone = _alone(model, engine_kw, prompts)
    packs = _spy_packed(monkeypatch)
    llm = _engine(model, **engine_kw)
    rows = [llm.cache.open_row() for _ in prompts]
    logits = llm.runner.prefill_batch(rows, prompts, [0] * len(prompts))
    assert packs == [list(range(len(prompts)))] * model.config.num_hidden_layers
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[i], alone[i][0], atol=1e-4, rtol=1e-4)
        _assert_same_state(_state(llm, rows[i], len(prompt)), alone[i][1])


def _spy(llm) -> list[list[int]]:
    """Record the chunk sizes of every batched prefill forward of ``llm``."""
    calls: list[list[int]] = []
    inner = llm.runner.prefill_batch

    def prefill_batch(rows, chunks, seen):
        calls.append([len(c) for c in chunks])
        return inner(rows, chunks, seen)

    llm.runner.prefill_batch = prefill_batch
    return calls


@pytest.mark.parametrize("name", ["dmc-w4", "dmc-unbounded", "vanilla", "delay-3"])
def test_engine_steps_share_the_prefill_budget_and_keep_the_tokens(name):
    """prefill_chunk = 16 tokens a step, shared: the 40-token prompt goes over three steps while the short
    ones join the batch as the budget allows; greedy tokens equal each prompt generated alone and HF's."""
    model_kw, engine_kw = MODELS[name]
    model = dmc_model("llama", **model_kw)
    prompts = _prompts((40, 5, 6, 9, 2), seed=1)
    llm = _engine(model, prefill_chunk=16, **engine_kw)
    calls = _spy(llm)
    outs = llm.generate(prompts, GREEDY)
    assert calls[:4] == [[16], [16], [8, 5, 3], [3, 9, 2]]  # continuing first, then admission in order
    alone = [_engine(model, max_num_seqs=1, **engine_kw).generate([p], GREEDY)[0] for p in prompts]
    for prompt, out, one in zip(prompts, outs, alone):
        assert out.token_ids == one.token_ids
        assert out.compression == one.compression
        if not model_kw.get("merge_delay"):  # (HF generate with a delay: tests/test_engine_delay.py)
            assert out.token_ids == _hf_greedy(model, prompt, GREEDY.max_tokens)
    _assert_no_leak(llm)


def test_a_request_mid_prefill_is_not_decoded():
    """Until its last chunk is in, a request holds a row but gets no token; the others decode meanwhile."""
    model = dmc_model("llama", window=4)
    llm = _engine(model, prefill_chunk=8)
    short, long = (llm.add_request(p, GREEDY) for p in _prompts((3, 29), seed=2))
    llm.step()  # short: 3 tokens + 5 of long; short decodes
    assert len(short.output_ids) == 2 and long.prefilling and not long.output_ids and long.seen == 5
    llm.step()
    llm.step()
    assert long.prefilling and long.seen == 21 and len(short.output_ids) == 4
    llm.step()  # the last 8 tokens: the first token is sampled, and one decoded
    assert not long.prefilling and len(long.output_ids) == 2
    while llm.has_unfinished():
        llm.step()
    _assert_no_leak(llm)
