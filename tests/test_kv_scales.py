"""Calibrated fp8 scales per (layer, KV head) (:mod:`dmc.engine.kv_scales`).

- calibration records the range of exactly what prefill stores (the pooled, rotated keys and the values of
  every (layer, KV head)), whatever the cache dtype, and leaves the engine as it was (no page, no request id);
- an fp8 engine uses the calibrated scales at once; on a model whose values are small (deep in e4m3's
  subnormals at scale 1.0) they bring the logits much closer to the exact cache's;
- scales save and load; bad scales, scales for a non-fp8 cache and a calibration with requests in flight are
  refused with a message that says what to do.
"""

import argparse

import pytest
import torch
from conftest import dmc_model
from test_engine import _assert_no_leak, _engine, _prompts
from test_kv_fp8 import MODES, _forced_logits

import dmc
from dmc.cli._engine_args import add_engine_arguments, engine_config
from dmc.engine import KVScales
from dmc.engine.kv_scales import DEFAULT_HEADROOM
from dmc.kernels.reference import FP8_MAX


def _stored_amax(cache, row: int):
    """The largest |k|, |v| stored by ``row`` in every (layer, KV head) ``[L, H]``, read from its pages."""
    k_amax, v_amax = torch.zeros(cache.k_scale.shape), torch.zeros(cache.v_scale.shape)
    for layer in range(cache.layout.num_layers):
        lens = cache.lens[layer, row].long()
        for head, n in enumerate(lens.tolist()):
            slots = torch.arange(n)
            pages = cache.page_table[layer, row, head][slots // cache.layout.page_size].long()
            at = (pages, slots % cache.layout.page_size)
            k_amax[layer, head] = cache.k_pool[at].float().abs().max()
            v_amax[layer, head] = cache.v_pool[at].float().abs().max()
    return k_amax, v_amax


@pytest.mark.parametrize("mode", ["dmc", "unbounded", "vanilla"])
def test_observed_range_is_the_range_of_the_stored_slots(mode):
    """Prefill (two chunks, merges happening) with observation on: kv_amax is, per (layer, KV head), the
    largest magnitude of the slots the exact cache holds afterwards."""
    make, options = MODES[mode]
    llm = _engine(make(), **options)
    prompt = _prompts((40,), seed=5)[0]
    llm.cache.observe_kv(True)
    _, row = _forced_logits(llm, prompt, 20, 40)  # prefill only: no decode step (the kernels do not observe)
    k_amax, v_amax = llm.cache.kv_amax
    want_k, want_v = _stored_amax(llm.cache, row)
    torch.testing.assert_close(k_amax, want_k, rtol=0, atol=0)
    torch.testing.assert_close(v_amax, want_v, rtol=0, atol=0)
    assert (k_amax > 0).all() and len(set(k_amax.flatten().tolist())) > 1  # a range per head
    llm.cache.observe_kv(False)
    assert llm.cache.kv_amax is None


def test_calibration_sets_headroom_times_range_and_leaves_the_engine_as_it_was():
    """calibrate_kv_scales on an fp8 engine: scales = 2 · amax / 448 of what the exact engine's calibration
    observes (one-chunk prompts: the same states with either cache), now in use; no page, row or request id
    is taken, and the engine then serves as before."""
    model = dmc_model("qwen2", window=4)
    prompts = _prompts((30, 17, 25), seed=2)
    exact, fp8 = _engine(model), _engine(model, kv_cache_dtype="fp8")
    want = exact.calibrate_kv_scales(prompts)
    assert torch.equal(exact.cache.k_scale, torch.ones_like(exact.cache.k_scale))  # not fp8: nothing set
    estimate = vars(fp8.scheduler.estimate).copy()
    got = fp8.calibrate_kv_scales(prompts)
    torch.testing.assert_close(got.k, want.k, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.v, want.v, rtol=1e-6, atol=0)
    assert torch.equal(fp8.cache.k_scale, got.k) and torch.equal(fp8.cache.v_scale, got.v)
    llm = _engine(model)
    llm.cache.observe_kv(True)
    llm.generate(prompts, dmc.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    torch.testing.assert_close(got.k, llm.cache.kv_amax[0] * DEFAULT_HEADROOM / FP8_MAX, rtol=1e-6, atol=0)
    assert vars(fp8.scheduler.estimate) == estimate and fp8._next_id == 0
    _assert_no_leak(fp8)
    outs = fp8.generate(prompts, dmc.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [o.request_id for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in outs)
    _assert_no_leak(fp8)


def test_calibrated_scales_keep_small_values_out_of_e4m3s_subnormals():
    """Values scaled down by 1e-3 (|v| ~ 1e-3, below e4m3's smallest normal 2^-6, so scale 1.0 stores them
    with one or two bits) and a compensating o_proj: the model computes the same function, the exact cache
    does not care, and fp8 with calibrated scales stays several times closer to it than fp8 at scale 1.0."""
    model = dmc_model("qwen2", window=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(1e-3)
            layer.self_attn.o_proj.weight.mul_(1e3)
    prompt = _prompts((56,), seed=1)[0]
    exact, _ = _forced_logits(_engine(model), prompt, 8, 32)
    unit, _ = _forced_logits(_engine(model, kv_cache_dtype="fp8"), prompt, 8, 32)
    calibrated_llm = _engine(model, kv_cache_dtype="fp8")
    calibrated_llm.calibrate_kv_scales(_prompts((40, 33), seed=9))  # other prompts than the scored one
    calibrated, _ = _forced_logits(calibrated_llm, prompt, 8, 32)

    def error(logits):
        return float((logits - exact).norm() / (exact - exact.mean(-1, keepdim=True)).norm())

    assert 0 < error(calibrated) < 0.05
    assert error(calibrated) * 4 < error(unit), (error(calibrated), error(unit))


def test_scales_save_load_and_feed_an_engine(tmp_path):
    """KVScales round-trips through a safetensors file; LLM(kv_scales=path) and --kv-scales use it."""
    model = dmc_model("qwen2", window=4)
    scales = _engine(model).calibrate_kv_scales(_prompts((20,), seed=4))
    path = tmp_path / "kv_scales.safetensors"
    scales.save(path)
    loaded = KVScales.load(path)
    assert torch.equal(loaded.k, scales.k) and torch.equal(loaded.v, scales.v)
    llm = _engine(model, kv_cache_dtype="fp8", kv_scales=str(path))
    assert torch.equal(llm.cache.k_scale, scales.k) and torch.equal(llm.cache.v_scale, scales.v)
    model.save_pretrained(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    directory = str(tmp_path / "model")
    args = parser.parse_args([directory, "--kv-cache-dtype", "fp8", "--kv-scales", str(path)])
    assert engine_config(args).kv_scales == str(path)
    with pytest.raises(ValueError, match="--kv-scales are the scales of an fp8 cache: add --kv-cache-dtype fp8"):
        engine_config(parser.parse_args([directory, "--kv-scales", str(path)]))


def test_bad_scales_and_bad_calibration_calls_are_refused(tmp_path):
    model = dmc_model("qwen2", window=4)
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    with pytest.raises(ValueError, match="kv_scales are the scales of an fp8 cache"):
        _engine(model, kv_scales=KVScales(torch.ones(shape), torch.ones(shape)))
    with pytest.raises(ValueError, match="finite and positive"):
        KVScales(torch.zeros(shape), torch.ones(shape))
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads\]"):
        KVScales(torch.ones(3), torch.ones(3))
    with pytest.raises(FileNotFoundError, match="no fp8 scales file"):
        KVScales.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="headroom must be >= 1"):
        KVScales.from_amax(torch.ones(shape), torch.ones(shape), headroom=0.5)
    llm = _engine(model, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"must be \[num_layers, num_kv_heads\] = "):
        llm.cache.set_kv_scales(KVScales(torch.ones(shape[0] + 1, shape[1]), torch.ones(shape[0] + 1, shape[1])))
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        llm.calibrate_kv_scales([])
    llm.add_request(_prompts((10,))[0], dmc.SamplingParams(max_tokens=3))
    llm.step()  # the request holds slots now
    with pytest.raises(ValueError, match="no request in flight"):
        llm.calibrate_kv_scales(_prompts((10,)))
    with pytest.raises(RuntimeError, match="only change while the cache stores no slot"):
        llm.cache.set_kv_scales(KVScales(torch.ones(shape), torch.ones(shape)))
