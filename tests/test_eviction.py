"""H2O, TOVA and SnapKV with real eviction (spec §8): budget, eviction rule, equality to a masked reference."""

import pytest
import torch
from conftest import VOCAB, dmc_model, stock_model

import dmc
from dmc.baselines import EvictionCache, EvictionPolicy, budget_for
from dmc.baselines.eviction import keep_scores, kept_slots, pool_over_positions, slot_attention


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


@pytest.mark.parametrize("method", ["tova", "h2o", "snapkv"])
def test_eviction_equals_a_masked_reference(method):
    stock, model = _vanilla_dmc()
    policy = EvictionPolicy(method, budget=6, recent=2, window=2, kernel=3)
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


def _needle_case(length=40, needle=9, heads=2, group=2, d=16, window=4, seed=0):
    """Keys of noise with one "needle" key at position ``needle`` that the last ``window`` queries
    point at (as a question at the end of a prompt points at its answer)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, length, d, generator=g)
    direction = torch.randn(heads, d, generator=g)
    keys[0, :, needle] = 4 * direction
    q = 0.1 * torch.randn(1, heads * group, length, d, generator=g)
    q[0, :, -window:] += 4 * direction.repeat_interleave(group, 0)[:, None]
    positions = torch.arange(length).expand(1, heads, length)
    return q, keys, positions


def _snapkv_kept(policy, q, keys, positions):
    length = keys.shape[-2]
    attention = slot_attention(q, keys, positions, torch.arange(length)[None], keys.shape[-1] ** -0.5,
                               torch.ones(1, length, dtype=torch.bool), last=policy.scoring_queries)
    keep, _ = keep_scores(policy, attention, torch.zeros_like(attention), positions)
    order, kept = kept_slots(keep, positions, policy.budget)
    return [set(positions[0, h].gather(0, order[0, h])[kept[0, h]].tolist()) for h in range(keys.shape[1])]


def test_snapkv_keeps_the_needle_and_its_neighbours_that_recency_drops():
    q, keys, positions = _needle_case(needle=9, window=4)
    recent = set(range(40 - 12, 40))  # what a recency window of the same 12 slots keeps
    assert 9 not in recent
    for pooling, kernel, cluster in (("max", 7, set(range(6, 13))), ("avg", 7, {9}), ("max", 1, {9})):
        policy = EvictionPolicy("snapkv", budget=12, window=4, pooling=pooling, kernel=kernel)
        for kept in _snapkv_kept(policy, q, keys, positions):
            assert len(kept) == 12 and set(range(36, 40)) <= kept  # the observation window itself
            assert cluster <= kept  # max pooling keeps the needle's neighbours: the context of a hit
    # TOVA, scored by the last query alone, keeps it too here
    assert all(9 in kept for kept in _snapkv_kept(EvictionPolicy("tova", budget=12), q, keys, positions))


def test_pooling_follows_token_order_not_storage():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 10, generator=g)
    positions = torch.stack([torch.randperm(10, generator=g) for _ in range(6)]).view(2, 3, 10)
    positions[1, 2, 7:] = -1  # padding slots: no part in the pools, score 0
    for pooling in ("max", "avg"):
        pooled = pool_over_positions(scores, positions, pooling, kernel=3)
        for b in range(2):
            for h in range(3):
                real = positions[b, h] >= 0
                slots = sorted(torch.nonzero(real).flatten().tolist(), key=lambda i: int(positions[b, h, i]))
                seq = scores[b, h][slots]  # in token order: neighbours are the next kept positions
                for rank, slot in enumerate(slots):
                    near = seq[max(0, rank - 1):rank + 2]
                    want = near.max() if pooling == "max" else near.mean()
                    torch.testing.assert_close(pooled[b, h, slot], want)
                assert torch.all(pooled[b, h][~real] == 0)


def test_snapkv_prompt_compression_through_generate():
    """One prompt forward keeps the observation window plus the best of the rest; decoding keeps the
    budget and the protected window of the newest tokens."""
    _, model = _vanilla_dmc()
    policy = EvictionPolicy("snapkv", budget=8, window=3)
    cache = EvictionCache(model.config, policy)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            assert layer.keys.shape[-2] == 8 and all({17, 18, 19} <= set(h.tolist()) for h in layer.positions[0])
        model.generate(prompt, past_key_values=EvictionCache(model.config, policy), max_new_tokens=5,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
        out = model(prompt[:, :1], past_key_values=cache, use_cache=True)
        for _ in range(4):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        assert torch.all(layer.lengths == 8)
        assert all({22, 23, 24} <= set(h.tolist()) for h in layer.positions[0])


def test_policy_errors_and_budget_matching():
    with pytest.raises(ValueError, match="unknown eviction method"):
        EvictionPolicy("lru", 4)
    with pytest.raises(ValueError, match=">= 1 slot"):
        EvictionPolicy("tova", 0)
    with pytest.raises(ValueError, match="observation window"):
        EvictionPolicy("snapkv", 8, window=9)
    with pytest.raises(ValueError, match="pooling kernel"):
        EvictionPolicy("snapkv", 64, kernel=4)
    with pytest.raises(ValueError, match="unknown SnapKV pooling"):
        EvictionPolicy("snapkv", 64, pooling="min")
    assert EvictionPolicy("snapkv", 256).window == 32 and EvictionPolicy("snapkv", 10).window == 5
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
