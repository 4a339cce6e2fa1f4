"""The DMC model on HF architectures: spec §7 checks 1, 3, 4, 5 in fp32 with merges happening."""

import pytest
import torch
import transformers
from conftest import COMMON, VOCAB, dmc_model, group_lengths, stock_model

import dmc
from dmc.hf.cache import DMCCache

TOL = dict(rtol=1e-4, atol=2e-5)


def _ids(batch=2, length=40, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _assert_merging(decisions, window):
    rate = float(decisions.mean())
    assert 0.2 < rate < 0.8, f"merge rate {rate:.2f}: the test needs real merges"
    if window is not None:
        assert int(group_lengths(decisions).max()) > window, "some groups must exceed the window"


def _decode_token_by_token(model, ids):
    cache, logits = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


# ----------------------------------------------------------------------------------- §7.1
def test_alpha_zero_equals_original_with_channel_zeroed(family):
    stock = stock_model(family)
    dmc.zero_decision_channels(stock)  # q[D-1] = k[D-1] = 0, so a = -c < 0: every token appends
    model = dmc.convert(stock, dmc.DMCConfig())
    ids = _ids()
    with torch.no_grad():
        expected = stock(ids).logits
        full = model(ids, use_cache=False)
        decoded, cache = _decode_token_by_token(model, ids)
    assert float(full.decisions.sum()) == 0
    torch.testing.assert_close(full.logits, expected, **TOL)
    torch.testing.assert_close(decoded, expected, **TOL)
    assert torch.all(cache.slot_counts() == ids.shape[1])


def test_vanilla_mode_equals_untouched_original(family):
    stock = stock_model(family)
    model = dmc.convert(stock)
    model.set_dmc_mode(vanilla=True)
    ids = _ids()
    with torch.no_grad():
        expected = stock(ids).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, **TOL)
        torch.testing.assert_close(_decode_token_by_token(model, ids)[0], expected, **TOL)
        model.set_dmc_mode(vanilla=True, channel_scale=0.0)  # zero-out stage at μ = 0
        dmc.zero_decision_channels(stock)
        torch.testing.assert_close(model(ids, use_cache=False).logits, stock(ids).logits, **TOL)


def test_convert_leaves_input_untouched():
    stock = stock_model("llama")
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    model = dmc.convert(stock)
    dmc.zero_decision_channels(model)
    assert all(torch.equal(before[k], v) for k, v in stock.state_dict().items())
    assert type(stock) is transformers.LlamaForCausalLM


# ----------------------------------------------------------------------------------- §7.3
@pytest.mark.parametrize("window", [4, 12, None])
def test_token_by_token_equals_full_sequence(family, window):
    model = dmc_model(family, window=window)
    ids = _ids(length=48)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        decoded, cache = _decode_token_by_token(model, ids)
    _assert_merging(full.decisions, window if window != 12 else None)
    torch.testing.assert_close(decoded, full.logits, **TOL)


def test_chunked_decoding_equals_full_sequence(family):
    model = dmc_model(family, window=4)
    ids = _ids(length=50, seed=2)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        cache, logits, t = None, [], 0
        for size in [7, 1, 13, 2, 1, 20, 6]:
            out = model(ids[:, t:t + size], past_key_values=cache, use_cache=True)
            cache, t = out.past_key_values, t + size
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, **TOL)


def test_mistral_decodes_like_its_full_sequence():
    model = dmc_model("mistral", window=4)
    ids = _ids(length=32)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        torch.testing.assert_close(_decode_token_by_token(model, ids)[0], full.logits, **TOL)


# ----------------------------------------------------------------------------------- §7.4
@pytest.mark.parametrize("window", [4, None])
def test_prefill_leaves_token_by_token_state(family, window):
    model = dmc_model(family, window=window)
    ids = _ids(length=45, seed=4)
    with torch.no_grad():
        prefill = model(ids, use_cache=True).past_key_values
        _, stepped = _decode_token_by_token(model, ids)
    assert torch.equal(prefill.slot_counts(), stepped.slot_counts())
    assert torch.equal(prefill.positions, stepped.positions)
    for a, b in zip(prefill.layers, stepped.layers):
        assert a.keys.shape == b.keys.shape
        for layer in (a, b):  # compare only real slots: shorter heads are padded
            mask = torch.arange(layer.keys.shape[-2])[None, None, :] < layer.lengths[..., None]
            layer._real = mask
        torch.testing.assert_close(a.keys[a._real], b.keys[b._real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values[a._real], b.values[b._real], rtol=1e-5, atol=1e-5)
        # Projections of 1 token vs 45 run through differently blocked GEMMs, so values agree to
        # float rounding; which tokens are in the open group (ω != 0) must agree exactly.
        torch.testing.assert_close(a.window_state, b.window_state, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.window_state[..., -1] != 0, b.window_state[..., -1] != 0)


# ----------------------------------------------------------------------------------- §7.5
def test_cache_cr_equals_forward_pass_cr(family):
    model = dmc_model(family)
    ids = _ids(batch=3, length=37)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        cache = model(ids, use_cache=True).past_key_values
    mean_alpha = float(full.decisions.double().mean())
    from_cache = dmc.CompressionStats.from_cache(cache)
    assert from_cache.overall_cr == pytest.approx(1 / (1 - mean_alpha), rel=1e-12)
    assert full.compression.overall_cr == pytest.approx(from_cache.overall_cr, rel=1e-12)
    torch.testing.assert_close(full.compression.per_head_cr, from_cache.per_head_cr)
    slots = (1 - full.decisions).sum(-1).permute(1, 0, 2).long()  # [layers, B, H]
    assert torch.equal(cache.slot_counts(), slots)


# ----------------------------------------------------------------------------------- save/load
def test_save_and_auto_load_round_trip(tmp_path, family):
    model = dmc_model(family, window=6, target_cr=4.0)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.dmc_config == model.dmc_config
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_unsupported_model_raises_clear_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(dmc.UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        dmc.convert(gpt2)
    with pytest.raises(dmc.UnsupportedModelError, match="already a DMC model"):
        dmc.convert(dmc_model("llama"))
    sliding = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, max_window_layers=0))
    with pytest.raises(dmc.UnsupportedModelError, match="sliding-window"):
        dmc.convert(sliding)


def test_filled_foreign_cache_is_rejected():
    model = dmc_model("llama")
    stock_cache = transformers.DynamicCache()
    stock_cache.update(torch.zeros(2, 4, 3, 16), torch.zeros(2, 4, 3, 16), 0)
    with pytest.raises(TypeError, match="dmc.DMCCache"):
        model(_ids(), past_key_values=stock_cache, use_cache=True)
    assert isinstance(model(_ids(), past_key_values=transformers.DynamicCache(), use_cache=True).past_key_values,
                      DMCCache)
