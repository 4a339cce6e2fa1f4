"""Batched prefill: several requests' chunks in one forward leave every cache row exactly as
prefilling each request alone does (slots, window state, delay ring; spec §7.4), and the engine's steps
(a shared prefill budget, long prompts chunked over several steps) give the tokens of one-at-a-time runs.
Tiny fp32 models with merges happening: DMC (bounded and unbounded windows), vanilla, delayed merging.
First chunks run packed (one pooling, attention and cache write per layer for all of them), delayed merging
included: its packed chunks equal the per-segment path, decode steps after them too."""

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
    layers = model.config.num_hidden_layers
    # five first chunks: one packed group in every layer; with delayed merging the chunks longer than w commit
    # their first n - w tokens (one write) and every chunk's last min(n, w) go into the delay ring (another)
    commits, holds = PACKED[name][0]
    assert packs == {"commit": [commits] * layers, "hold": [holds] * layers if holds else []}
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[i], alone[i][0], atol=1e-4, rtol=1e-4)
        _assert_same_state(_state(llm, rows[i], len(prompt)), alone[i][1])
    merges = 1 - sum(int(s["slots"].sum()) for _, s in alone) / (sum(LENGTHS) * llm.cache.layout.rows)
    assert (merges == 0) if engine_kw.get("vanilla") else (merges > 0.2)

    chunked = _engine(model, **engine_kw)
    rows = [chunked.cache.open_row() for _ in prompts]
    seen = [0] * len(prompts)
    plan = [{0: 10, 2: 3, 3: 1}, {0: 13, 1: 2, 2: 30, 4: 7}, {1: 3, 2: 8, 4: 5}]  # prompt -> tokens this call
    for calls in packs.values():
        calls.clear()
    for call in plan:
        order = list(call)
        chunks = [prompts[i][seen[i]:seen[i] + call[i]] for i in order]
        logits = chunked.runner.prefill_batch([rows[i] for i in order], chunks, [seen[i] for i in order])
        for i in order:
            seen[i] += call[i]
    assert seen == [len(p) for p in prompts]
    # packed: all three chunks of the first call; in the second, the first chunks of prompts 1 and 4 (segments
    # 1 and 3, not adjacent) while prompts 0 and 2 go on alone; nothing in the third. Delayed merging: only the
    # chunks longer than w commit (the 3-token chunk of prompt 2 at w = 3 is all raw, the 7 of prompt 4 at w = 8)
    (first_commit, second_commit), holds = PACKED[name][1]
    assert packs == {"commit": [first_commit] * layers + ([second_commit] * layers if second_commit else []),
                     "hold": [[0, 1, 2]] * layers + [[1, 3]] * layers if holds else []}
    for i, prompt in enumerate(prompts):
        _assert_same_state(_state(chunked, rows[i], len(prompt)), alone[i][1])
    for j, i in enumerate(plan[-1]):  # the last call ended prompts 1, 2 and 4
        torch.testing.assert_close(logits[j], alone[i][0], atol=1e-4, rtol=1e-4)


# name -> ((commits, holds) of the one forward, ((first, second call's commits), holds) of the chunked calls)
PACKED = {name: (([0, 1, 2, 3, 4], []), (([0, 1, 2], [1, 3]), False)) for name in MODELS}
PACKED["delay-3"] = (([0, 1, 2, 4], [0, 1, 2, 3, 4]), (([0], [3]), True))
PACKED["delay-8"] = (([0, 2, 4], [0, 1, 2, 3, 4]), (([0], None), True))


def _spy_packed(monkeypatch) -> dict[str, list[list[int]]]:
    """Record, for every layer's packed writes of first chunks, the segments each wrote (``PackedChunks.members``):
    "commit" their slots and window state (with delayed merging: of the tokens that leave the window), "hold"
    the raw tokens of the delay ring (delayed merging only)."""
    calls: dict[str, list[list[int]]] = {"commit": [], "hold": []}
    for kind in calls:
        inner = getattr(runner, f"{kind}_packed")

        def spy(views, packed, *args, kind=kind, inner=inner):
            calls[kind].append(list(packed.members))
            return inner(views, packed, *args)

        monkeypatch.setattr(runner, f"{kind}_packed", spy)
    return calls


DELAYED = {  # name -> (family, window, merge_delay): GQA, MHA, Qwen3's norms
    "qwen2-w4-delay3": ("qwen2", 4, 3),
    "llama-w12-delay32": ("llama", 12, 32),  # the default recipe's w
    "qwen3-unbounded-delay8": ("qwen3", None, 8),
}
DECODE_STEPS = 4


def _cache_tensors(llm, rows: list[int], seen: list[int]) -> dict:
    """Every tensor the prefill writes: per row its slots gathered from its pages (page ids aside), lengths,
    window state and delay ring (the raw tensors, whole: the rows were opened in the same order), and the
    pages taken."""
    cache = llm.cache
    out = {name: getattr(cache, name).clone()  # copies: the decode steps write the cache in place
           for name in ("lens", "ring", "ring_kv", "ring_w", "delay_kv", "delay_aw", "delay_rope")}
    out["free_pages"] = cache.free_page_count()
    for row, n in zip(rows, seen):
        out[f"row {row}"] = _state(llm, row, n)
    return out


def _assert_same_cache(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["free_pages"] == b["free_pages"]
    assert torch.equal(a["lens"], b["lens"])
    for name in a:
        if name.startswith("row "):
            _assert_same_state(a[name], b[name])
        elif name not in ("free_pages", "lens"):
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5, msg=name)


def _delayed_prefill_then_decode(model, engine_kw, lengths, packing: bool, monkeypatch):
    """A continuing sequence (its first chunk fed in an earlier call) and fresh prompts of ``lengths`` in one
    batched prefill, then DECODE_STEPS decode steps of all of them (fixed input tokens); ``packing`` False: every
    chunk alone per layer (the per-segment path). Returns the logits of each call, the cache tensors after the
    prefill and after the decode steps, and the packed writes recorded."""
    delay = model.dmc_config.merge_delay
    head = _prompts((2 * delay + 3,), seed=7)[0]
    prompts = _prompts(lengths, seed=5)
    inputs = torch.tensor(_prompts((len(prompts) + 1,) * DECODE_STEPS, seed=9))
    with monkeypatch.context() as patch:
        if not packing:
            patch.setattr(runner, "pack_first_chunks", lambda *args, **kwargs: None)
        packs = _spy_packed(patch)
        llm = _engine(model, **engine_kw)
        device = llm.cache.device
        first = llm.cache.open_row()
        logits = [llm.runner.prefill_batch([first], [head[:delay + 4]], [0])]
        rows = [first] + [llm.cache.open_row() for _ in prompts]
        logits.append(llm.runner.prefill_batch(rows, [head[delay + 4:]] + prompts, [delay + 4] + [0] * len(prompts)))
        seen = [len(head)] + list(lengths)
        states = [_cache_tensors(llm, rows, seen)]
        for tokens in inputs:
            logits.append(llm.runner.decode(tokens.to(device), torch.tensor(seen, dtype=torch.int32, device=device),
                                            torch.tensor(rows, dtype=torch.int32, device=device)))
            seen = [n + 1 for n in seen]
        states.append(_cache_tensors(llm, rows, seen))
    return logits, states, packs


def _check_delayed_packing(model, engine_kw, lengths, monkeypatch, logits_tol: float = 1e-5) -> None:
    """The packed first chunks of a delayed model leave the cache and logits of the per-segment path (fp32,
    tight tolerance), and the decode steps after them too; the packing did happen, with merges."""
    per_segment = _delayed_prefill_then_decode(model, engine_kw, lengths, False, monkeypatch)
    packed = _delayed_prefill_then_decode(model, engine_kw, lengths, True, monkeypatch)
    delay, layers = model.dmc_config.merge_delay, model.config.num_hidden_layers
    assert per_segment[2] == {"commit": [], "hold": []}
    # the continuing sequence's first chunk alone (packed too: one first chunk), then the six fresh ones beside
    # it: those longer than w commit their first n - w tokens, all of them go into the delay ring
    longer = [1 + i for i, n in enumerate(lengths) if n > delay]
    assert 0 < len(longer) < len(lengths) and min(lengths) < delay and delay in lengths
    assert packed[2] == {"commit": [[0]] * layers + [longer] * layers,
                         "hold": [[0]] * layers + [list(range(1, len(lengths) + 1))] * layers}
    for step, (a, b) in enumerate(zip(packed[0], per_segment[0])):
        torch.testing.assert_close(a, b, atol=logits_tol, rtol=logits_tol, msg=f"logits of call {step}")
    for a, b in zip(packed[1], per_segment[1]):
        _assert_same_cache(a, b)
    # merges happened: the pages hold far fewer slots than the tokens that left the windows
    committed = sum(n - min(n, delay) for n in [2 * delay + 3] + list(lengths))
    assert int(packed[1][0]["lens"].sum()) < 0.8 * committed * model.config.num_key_value_heads * layers


@pytest.mark.parametrize("name", list(DELAYED))
def test_delayed_first_chunks_run_packed_and_leave_the_per_segment_cache(name, monkeypatch):
    """Delayed merging: a batched prefill of six fresh prompts (shorter than w, exactly w, longer, much longer)
    beside a continuing sequence packs the fresh ones (one commit of the tokens that leave the window, one write
    of the delay ring per layer) and leaves every cache tensor the per-segment path writes (slots, lengths,
    window state, delay ring, pages taken) and its logits; four decode steps of all seven sequences after it
    give the same logits and cache too."""
    family, window, delay = DELAYED[name]
    model = dmc_model(family, window=window, merge_delay=delay)
    lengths = [delay + 9, 2, delay, 1, 3 * delay + 5, delay + 1]
    _check_delayed_packing(model, dict(max_model_len=256), lengths, monkeypatch)


@pytest.mark.parametrize("name", ["qwen2-w4-delay3", "llama-w12-delay32"])
def test_delayed_packed_flex_mask_equals_the_per_segment_path(name, monkeypatch):
    """The CUDA path's attention on a CPU (eager FlexAttention, ``prefill_attention="flex"``): one call per layer
    over all the packed first chunks, the delayed block mask within their document ids, padded to a bucket
    (128 and 256 tokens here): the cache and logits of the per-segment path (which takes SDPA)."""
    family, window, delay = DELAYED[name]
    model = dmc_model(family, window=window, merge_delay=delay)
    from dmc.hf import attention
    sizes = []
    flex = attention.flex_attend_delayed

    def spy(q, *args):
        sizes.append(q.shape[-2])
        return flex(q, *args)

    monkeypatch.setattr(attention, "flex_attend_delayed", spy)
    lengths = [delay + 9, 2, delay, 1, 3 * delay + 5, delay + 1]
    _check_delayed_packing(model, dict(max_model_len=256, prefill_attention="flex"), lengths, monkeypatch)
    bucket = 128 if sum(lengths) <= 128 else 256
    assert sizes == [128] * model.config.num_hidden_layers + [bucket] * model.config.num_hidden_layers


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
    assert packs == {"commit": [list(range(len(prompts)))] * model.config.num_hidden_layers, "hold": []}
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[i], alone[i][0], atol=1e-4, rtol=1e-4)
        _assert_same_state(_state(llm, rows[i], len(prompt)), alone[i][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton pooling and FlexAttention need CUDA")
@pytest.mark.parametrize("name", list(DELAYED))
def test_gpu_delayed_packed_first_chunks_leave_the_per_segment_cache(name, monkeypatch):
    """On CUDA a delayed model's packed first chunks take the Triton pooling (bounded windows) and one
    FlexAttention call with the delayed mask over the document ids (padded to a bucket, chunks across 128-token
    blocks); the per-segment path takes the PyTorch pooling and SDPA with a dense mask per chunk: the same
    logits and cache, and the same decode steps (the Triton delayed kernels) after them."""
    family, window, delay = DELAYED[name]
    model = dmc_model(family, window=window, merge_delay=delay).cuda()
    assert model.config.hidden_size // model.config.num_attention_heads >= 16  # FlexAttention's smallest head
    calls = {"flex": 0, "pool": 0}
    from dmc.hf import attention
    from dmc.kernels import triton_kernels
    flex, pool = attention.flex_attend_delayed, triton_kernels.chunk_states

    def count(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention, "flex_attend_delayed", count("flex", flex))
    monkeypatch.setattr(triton_kernels, "chunk_states", count("pool", pool))
    lengths = [delay + 9, 2, delay, 1, 3 * delay + 5, delay + 1, 150]
    engine_kw = dict(device="cuda", dtype=torch.float32, kv_cache_memory=64 * 2**20, max_model_len=256)
    # logits: FlexAttention's and SDPA's fp32 sums in other orders (the cache is held to 1e-5)
    _check_delayed_packing(model, engine_kw, lengths, monkeypatch, logits_tol=1e-4)
    layers = model.config.num_hidden_layers
    assert calls["flex"] == 2 * layers  # the packed forwards only (two: the earlier first chunk, then six)
    assert calls["pool"] == (2 * layers if window is not None else 0)


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
