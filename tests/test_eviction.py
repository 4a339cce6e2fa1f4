"""H2O and TOVA with real eviction (spec §8): budget, eviction rule, equality to a masked reference."""

import pytest
import torch
from conftest import VOCAB, dmc_model, stock_model

import dmc
from dmc.baselines import EvictionCache, EvictionPolicy, budget_for


def _vanilla_dmc(seed=0):
    stock = stock_model("llama", seed)
    stock.config._attn_implementation = "eager"
    model = dmc.convert(stock)
    model.set_dmc_mode(vanilla=True)
    return stock, model.eval()


def _decode(model, cache, prompt, steps):
    """Greedy decoding; returns the per-step logits and, per step and layer, the token positions
    each head could see (the cache before the step, plus the new token itself)."""
    seen_per_step, logits = [], []
    out = model(prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    ids = torch.cat([prompt, token], dim=1)
    for _ in range(steps):
        t = ids.shape[1] - 1
        seen_per_step.append([[set(p[p >= 0].tolist()) | {t} for p in layer.positions[0]] for layer in cache.layers])
        out = model(ids[:, -1:], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
    return ids, torch.cat(logits), seen_per_step


@pytest.mark.parametrize("method", ["tova", "h2o"])
def test_eviction_equals_a_masked_reference(method):
    stock, model = _vanilla_dmc()
    policy = EvictionPolicy(method, budget=6, recent=2)
    cache = EvictionCache(model.config, policy)
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids, logits, seen = _decode(model, cache, prompt, steps=8)
    for layer in cache.layers:  # the budget holds and evicted slots are gone from storage
        assert torch.all(layer.lengths == 6) and layer.keys.shape[-2] == 6
    # reference: the stock model over the whole sequence, each layer's rows masked to what that
    # layer's heads could see when the row's token was decoded (full causal rows for the prompt)
    total = ids.shape[1] - 1
    heads = model.config.num_attention_heads
    masks = []
    for layer in range(model.config.num_hidden_layers):
        allowed = torch.tril(torch.ones(total, total, dtype=torch.bool)).expand(heads, total, total).clone()
        for step, per_layer in enumerate(seen):
            row = prompt.shape[1] + step
            allowed[:, row] = False
            for head, positions in enumerate(per_layer[layer]):
                allowed[head, row, sorted(positions)] = True
        masks.append(torch.zeros(1, heads, total, total).masked_fill(~allowed, float("-inf")))
    for layer, mask in zip(stock.model.layers, masks):
        original = layer.self_attn.forward
        layer.self_attn.forward = (lambda orig, m: lambda *a, **k: orig(*a, **{**k, "attention_mask": m}))(original, mask)
    with torch.no_grad():
        reference = stock(ids[:, :total]).logits[0, prompt.shape[1]:]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_tova_evicts_the_least_attended_slot():
    _, model = _vanilla_dmc()
    cache = EvictionCache(model.config, EvictionPolicy("tova", budget=5))
    layer = cache.layers[0]
    captured = {}
    original = layer._evict
    layer._evict = lambda score: (captured.__setitem__("score", score.clone()), original(score))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 5)), past_key_values=cache, use_cache=True)
        before = layer.positions.clone()
        model(torch.randint(0, VOCAB, (1, 1)), past_key_values=cache, use_cache=True)
    score = captured["score"]  # the last query's attention, per slot (6 slots: 5 old + the new token)
    for head in range(before.shape[1]):
        all_positions = before[0, head].tolist() + [5]
        evicted = set(all_positions) - set(layer.positions[0, head].tolist())
        assert evicted == {all_positions[int(score[0, head].argmin())]}


def test_h2o_keeps_the_recent_window():
    _, model = _vanilla_dmc()
    cache = EvictionCache(model.config, EvictionPolicy("h2o", budget=6, recent=3))
    with torch.no_grad():
        out = model(torch.randint(0, VOCAB, (1, 12)), past_key_values=cache, use_cache=True)
        for _ in range(5):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    newest = 12 + 5 - 1
    for layer in cache.layers:
        for head in layer.positions[0]:
            assert {newest, newest - 1, newest - 2} <= set(head.tolist()) and len(head) == 6


def test_policy_errors_and_budget_matching():
    with pytest.raises(ValueError, match="unknown eviction method"):
        EvictionPolicy("lru", 4)
    with pytest.raises(ValueError, match=">= 1 slot"):
        EvictionPolicy("tova", 0)
    assert budget_for(4096, 4.0) == 1024 and budget_for(1000, 3.0) == 334
    model = dmc_model("llama")  # DMC mode, merges happening: eviction would mix two policies
    with pytest.raises(ValueError, match="vanilla mode"):
        model(torch.randint(0, VOCAB, (1, 32)), use_cache=True,
              past_key_values=EvictionCache(model.config, EvictionPolicy("tova", 4)))


def test_generate_with_an_eviction_cache():
    stock, model = _vanilla_dmc()
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        roomy = model.generate(prompt, past_key_values=EvictionCache(model.config, EvictionPolicy("h2o", 64)), **kw)
        assert torch.equal(roomy, stock.generate(prompt, **kw))  # nothing evicted: the original model
        tight = EvictionCache(model.config, EvictionPolicy("tova", 4))
        model.generate(prompt, past_key_values=tight, **kw)
    assert all(torch.all(layer.lengths == 4) for layer in tight.layers)
