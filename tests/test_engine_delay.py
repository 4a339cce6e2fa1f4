"""The engine (dmc.LLM) with delayed merging (``merge_delay`` w > 0) against the HF path: same greedy
tokens as ``generate()`` with the DMC cache, same slot counts (the raw window counted), chunked prefill
leaving exactly the state of token-by-token decoding, no page leaks. fp32, merges happening. The decode
step's Triton kernels (dmc.kernels.triton_delayed, run here in Triton's interpreter) against the twins."""

import contextlib

import pytest
import torch
from conftest import dmc_model
from test_engine import _assert_no_leak, _engine, _prompts, _row_state
from test_kernels import interpreter

import dmc
from dmc.engine.cache import CacheLayout, SequenceView

STEPS = 12
GREEDY = dmc.SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
# prompts shorter and longer than w (3 and 8), several in one batch
LENGTHS = (11, 2, 17, 40, 5)


def _hf_generate(model, prompt, n):
    """HF greedy tokens and the slots each head of its DMC cache keeps ``[L, H]`` afterwards."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, dmc.DMCCache)
    return out.sequences[0, len(prompt):].tolist(), cache.slot_counts()[:, 0], cache


@pytest.mark.parametrize("family,window,delay", [("llama", 4, 3), ("llama", 4, 8), ("qwen2", 4, 3),
                                                 ("qwen3", None, 8), ("mistral", 12, 3)])
def test_greedy_and_slots_equal_hf_generate(family, window, delay):
    model = dmc_model(family, window=window, merge_delay=delay)
    prompts = _prompts(LENGTHS, seed=delay)
    llm = _engine(model, prefill_chunk=7)  # every prompt but the shortest ones prefilled in chunks
    assert llm.cache.layout.delay_width == delay
    outs = llm.generate(prompts, GREEDY)
    merged = 0.0
    for prompt, out in zip(prompts, outs):
        tokens, slots, cache = _hf_generate(model, prompt, STEPS)
        assert out.token_ids == tokens
        stats = dmc.CompressionStats.from_cache(cache)
        assert out.compression["tokens"] == len(prompt) + STEPS - 1
        assert out.compression["slots"] == int(slots.sum())  # the raw window's tokens counted
        assert out.compression["cr"] == pytest.approx(stats.overall_cr, rel=1e-12)
        assert out.compression["per_layer_cr"] == [round(float(x), 4) for x in stats.per_layer_cr]
        assert int(slots.min()) >= min(delay, len(prompt) + STEPS - 1)
        merged = max(merged, out.compression["merge_rate"])
    assert merged > 0.2  # merges really happened
    _assert_no_leak(llm)


@contextlib.contextmanager
def triton_decode(on: bool):
    """Engines built inside pick the Triton kernels (DMC_FORCE_TRITON=1, in the interpreter on a CPU)."""
    if not on:
        yield
        return
    if torch.cuda.is_available():  # these tests' models live on the CPU; on a GPU the CUDA tests below run Triton
        pytest.skip("the CPU model's Triton decode runs in the interpreter, on machines without CUDA")
    with interpreter(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("DMC_FORCE_TRITON", "1")
        yield


@pytest.mark.parametrize("family,window,delay", [("qwen2", None, 3), ("qwen3", 12, 8)])
def test_triton_decode_equals_twins_and_hf_generate(family, window, delay):
    """The delayed decode step through Triton: the same greedy tokens and compression as the twins' engine
    and as HF generate, and the same cache afterwards (slots, window state, delay ring)."""
    model = dmc_model(family, window=window, merge_delay=delay)
    prompts = _prompts((11, 2, 17), seed=delay)
    params = dmc.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine = dict(prefill_chunk=7, max_model_len=32)  # few pages per head: few splits to interpret
    twin = _engine(model, **engine)
    with triton_decode(True):
        fast = _engine(model, **engine)
        assert fast.runner.kernels.delayed_decode_update.__module__ == "dmc.kernels.triton_delayed"
        outs = fast.generate(prompts, params)
    for prompt, out, ref in zip(prompts, outs, twin.generate(prompts, params)):
        assert out.token_ids == ref.token_ids == _hf_generate(model, prompt, 10)[0]
        assert out.compression == ref.compression
    assert max(o.compression["merge_rate"] for o in outs) > 0.2
    _assert_no_leak(fast)


@pytest.mark.parametrize("window,delay,fast", [(4, 3, False), (None, 8, False), (4, 3, True)])
def test_chunked_prefill_equals_token_by_token(window, delay, fast):
    """The exact-state guarantee with a delay: a prompt prefilled in chunks (some smaller than w) leaves the
    slots, window state and raw ring of token-by-token decoding (the twins', or Triton's with ``fast``), and
    per-head counts equal the HF cache's."""
    model = dmc_model("qwen2", window=window, merge_delay=delay)
    prompt = _prompts((45,), seed=delay)[0]
    chunked = _engine(model, max_model_len=48)
    with triton_decode(fast):
        stepwise = _engine(model, max_model_len=48)
    a = chunked.cache.open_row()
    seen = 0
    for size in (7, 2, 1, 13, 22):
        chunked.runner.prefill(a, prompt[seen:seen + size], seen)
        seen += size
    assert seen == len(prompt)
    b = stepwise.cache.open_row()
    stepwise.runner.prefill(b, prompt[:1], 0)
    with triton_decode(fast):
        for t in range(1, len(prompt)):  # the engine's decode step, one token at a time
            stepwise.runner.decode(torch.tensor([prompt[t]]), torch.tensor([t], dtype=torch.int32),
                                   torch.tensor([b], dtype=torch.int32))
    (la, ka, va), (lb, kb, vb) = _row_state(chunked, a), _row_state(stepwise, b)
    assert torch.equal(la, lb) and int(la.max()) > 16  # crosses a page boundary
    assert 0.2 < 1 - la.sum() / ((len(prompt) - delay) * la.numel()) < 0.8
    torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)
    committed = len(prompt) - delay
    for layer in range(chunked.cache.layout.num_layers):
        torch.testing.assert_close(chunked.cache.window_prefix(layer, a, committed),
                                   stepwise.cache.window_prefix(layer, b, committed), atol=1e-5, rtol=1e-5)
        ring_a = SequenceView(chunked.cache, a, len(prompt)).layers[layer].pending
        ring_b = SequenceView(stepwise.cache, b, len(prompt)).layers[layer].pending
        assert ring_a["valid"].shape == (1, delay)
        for name in ring_a:
            torch.testing.assert_close(ring_a[name], ring_b[name], atol=1e-6, rtol=1e-6)
    _, slots, _ = _hf_generate(model, prompt, 1)  # HF's cache after the prompt
    assert torch.equal(chunked.cache.slot_counts(a, len(prompt)), slots)
    assert torch.equal(stepwise.cache.slot_counts(b, len(prompt)), slots)


def test_preemption_by_recompute_with_a_delay():
    model = dmc_model("qwen2", window=4, merge_delay=3)
    layout = CacheLayout(2, 2, 16, 0, 4, 128, 4, False, merge_delay=3)
    # room for ~2 sequences at CR 1 while admission believes 10x: preemption must happen
    llm = _engine(model, max_num_seqs=4, admission_margin=-0.9,
                  kv_cache_memory=layout.sequence_bytes(torch.float32) * 5 + 40 * layout.page_bytes(torch.float32))
    prompts = _prompts((30, 25, 28, 20))
    params = dmc.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert sum(o.num_preemptions for o in outs) > 0
    for prompt, out in zip(prompts, outs):
        assert out.error is None and out.token_ids == _hf_generate(model, prompt, 40)[0]
    _assert_no_leak(llm)


def test_delay_ring_is_counted_in_memory_planning_and_vanilla_has_none():
    plain = CacheLayout(2, 4, 16, 0, 4, 128, 4, False)
    delayed = CacheLayout(2, 4, 16, 0, 4, 128, 4, False, merge_delay=8)
    # per head 8 × (k, v in fp32 + α, ω), per row 8 × (cos, sin) in fp32
    assert delayed.sequence_bytes(torch.float32) - plain.sequence_bytes(torch.float32) == (
        plain.rows * 8 * (2 * 16 * 4 + 8) + 8 * 2 * 16 * 4)
    assert CacheLayout(2, 4, 16, 0, 4, 128, 4, True, merge_delay=8).delay_width == 0
    model = dmc_model("llama", window=4, merge_delay=3)
    vanilla = _engine(model, vanilla=True)
    assert vanilla.cache.layout.delay_width == 0 and not vanilla.runner.delay
    out = vanilla.generate(_prompts((9,)), GREEDY)[0]
    assert out.compression["cr"] == 1.0 and len(out.token_ids) == STEPS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window,delay", [(12, 8), (None, 3), (4, 32)])
def test_gpu_delayed_engine_equals_hf_generate(window, delay):
    """On CUDA a delayed model decodes with the Triton kernels in CUDA graphs: same tokens as HF generate."""
    model = dmc_model("qwen2", window=window, merge_delay=delay).cuda()
    prompts = _prompts(LENGTHS)
    llm = dmc.LLM(model, device="cuda", dtype=torch.float32, max_model_len=128, max_num_seqs=8, progress=False,
                  kv_cache_memory=64 * 2**20, prefill_chunk=7)
    outs = llm.generate(prompts, GREEDY)
    assert llm.runner.graphs  # the delayed step was captured
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=STEPS, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert out.token_ids == ref[0, len(prompt):].tolist()
    _assert_no_leak(llm)
