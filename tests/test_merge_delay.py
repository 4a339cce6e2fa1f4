"""Delayed merging (``merge_delay`` w > 0): the last w tokens of every head stay raw and a token merges
only once it is w tokens old. The §7 checks again, in fp32 with merges happening: the step-by-step
cache equals the full-sequence form, chunked and token-by-token prefill leave the same state, the CR
counts the window, and w = 0 is the paper's DMC."""

import pytest
import torch
from conftest import VOCAB, dmc_model

import dmc
from dmc import core

TOL = dict(rtol=1e-4, atol=2e-5)


def _ids(batch=2, length=40, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, ids, sizes):
    cache, logits, t = None, [], 0
    for size in sizes:
        out = model(ids[:, t:t + size], past_key_values=cache, use_cache=True)
        cache, t = out.past_key_values, t + size
        logits.append(out.logits)
    assert t == ids.shape[1]
    return torch.cat(logits, dim=1), cache


def test_delayed_bias_at_zero_delay_is_the_dmc_mask():
    key_bias = torch.randn(2, 3, 9).masked_fill(torch.rand(2, 3, 9) < 0.3, float("-inf"))
    bias = core.delayed_dense_bias(key_bias, 0)
    assert torch.equal(bias[..., :9], core.dense_bias(key_bias))
    assert torch.isinf(bias[..., 9:]).all()  # no raw keys


def test_delayed_bias_by_hand():
    key_bias = torch.tensor([[[0.5, 0.25, 0.125, 0.0625, 0.75]]])
    bias = core.delayed_dense_bias(key_bias, 2)[0, 0]
    inf = float("-inf")
    # query 3: pooled states 0 (bias 0.5) and 1 (its open slot as seen from 3 - 2 = 1: 0); raw keys 2, 3
    assert bias[3].tolist() == [0.5, 0.0, inf, inf, inf, inf, inf, 0.0, 0.0, inf]
    # query 1: nothing pooled yet (1 - 2 < 0); raw keys 0, 1
    assert bias[1].tolist() == [inf] * 5 + [0.0, 0.0, inf, inf, inf]


@pytest.mark.parametrize("delay", [1, 3, 8])
@pytest.mark.parametrize("window", [4, None])
def test_token_by_token_and_chunks_equal_full_sequence(family, delay, window):
    model = dmc_model(family, window=window, merge_delay=delay)
    ids = _ids(length=45, seed=delay)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        stepped, step_cache = _decode(model, ids, [1] * 45)
        chunked, chunk_cache = _decode(model, ids, [7, 1, 2, 13, 1, 1, 20])
        prefill = model(ids, use_cache=True)
    rate = float(full.decisions.mean())
    assert 0.2 < rate < 0.8, f"merge rate {rate:.2f}: the test needs real merges"
    torch.testing.assert_close(stepped, full.logits, **TOL)
    torch.testing.assert_close(chunked, full.logits, **TOL)
    torch.testing.assert_close(prefill.logits, full.logits, **TOL)
    # §7.4/§7.5: the same slots whatever the chunking, and the window's raw tokens count as slots
    counts = step_cache.slot_counts()
    assert torch.equal(chunk_cache.slot_counts(), counts)
    assert torch.equal(prefill.past_key_values.slot_counts(), counts)
    slots = (1 - full.decisions[..., :-delay]).sum(-1).permute(1, 0, 2).long() + delay
    assert torch.equal(counts, slots)
    from_cache = dmc.CompressionStats.from_cache(step_cache)
    assert full.compression.overall_cr == pytest.approx(from_cache.overall_cr, rel=1e-12)


def test_delay_changes_the_logits_and_zero_delay_is_dmc(family):
    ids = _ids(length=30)
    with torch.no_grad():
        plain = dmc_model(family)(ids, use_cache=False)
        zero = dmc_model(family, merge_delay=0)(ids, use_cache=False)
        delayed = dmc_model(family, merge_delay=4)(ids, use_cache=False)
    assert torch.equal(plain.logits, zero.logits)
    # Layer 0 decides the same (later layers see other inputs); the decisions take effect later.
    assert torch.equal(plain.decisions[:, 0], delayed.decisions[:, 0])
    assert not torch.allclose(plain.logits[:, 6:], delayed.logits[:, 6:], atol=1e-3)


def test_left_padded_batch_decodes_like_each_sequence_alone(family):
    model = dmc_model(family, merge_delay=3)
    a, b = _ids(1, 20, seed=1), _ids(1, 14, seed=2)
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 6:] = a[0], b[0]
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        alone = model(b, use_cache=False).logits
        cache, logits = None, []
        for t in range(0, 20, 5):
            out = model(batch[:, t:t + 5], attention_mask=mask[:, :t + 5], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1)[1, 6:], alone[0], **TOL)
    assert torch.isfinite(torch.cat(logits, 1)).all()
    assert int(cache.slot_counts()[:, 1].min()) >= 3


def test_flex_equals_dense_with_documents():
    """The FlexAttention form of delayed merging (score_mod + block mask over [pooled, raw] keys, packed
    documents) equals the dense bias form (forward; on CUDA experiments/real_model/delay_smoke.py also
    compares the gradients, FlexAttention has no backward on CPU)."""
    from dmc.hf.attention import delayed_block_mask, flex_attend_delayed

    torch.manual_seed(0)
    b, h, g, n, d, delay = 2, 2, 2, 40, 16, 5
    q, k_bar, k_raw = (torch.randn(b, h * g if i == 0 else h, n, d) for i in range(3))
    v_bar, v_raw = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    key_bias = torch.nn.functional.logsigmoid(torch.randn(b, h, n) * 3)
    docs = torch.zeros(b, n, dtype=torch.long)
    docs[:, 25:] = 1
    dense = dense_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, delay, docs)
    try:
        mask = delayed_block_mask(docs, b, n, delay, q.device)
        flex = flex_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, delay, 0.25, mask)
    except Exception as e:  # FlexAttention needs a compiler on CPU
        pytest.skip(f"FlexAttention unavailable on this machine: {e}")
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


def dense_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, delay, docs):
    from dmc.hf.attention import biased_attend
    bias = core.delayed_dense_bias(key_bias, delay, docs)
    return biased_attend(q, torch.cat([k_bar, k_raw], -2), torch.cat([v_bar, v_raw], -2), bias, 0.25)


def test_trained_with_delay_gets_gradients_on_the_decision_rows(family):
    model = dmc_model(family, merge_delay=4).train()
    ids = _ids(length=32)
    out = model(ids, labels=ids, dmc_target_cr=2.0, dmc_generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    rows = model.model.layers[0].self_attn.k_proj.weight.grad.view(-1, model.model.layers[0].self_attn.head_dim,
                                                                   model.config.hidden_size)[:, -1]
    assert rows.abs().sum() > 0


def test_compression_target_accounts_for_the_window():
    assert core.delayed_merge_rate(4.0, 1024, 0) == pytest.approx(0.75)
    rate = core.delayed_merge_rate(4.0, 1024, 32)
    assert core.delayed_cr(rate, 1024, 32) == pytest.approx(4.0)
    assert 32 + (1024 - 32) * (1 - rate) == pytest.approx(256)
    assert core.delayed_merge_rate(4.0, 1024, 300) == 1.0  # no room: merge all that can merge
    alpha = torch.full((2, 3, 2, 64), rate)  # the loss is 0 at exactly the delayed target rate
    assert float(core.compression_loss(alpha, 4.0, merge_delay=8)) > 0
    alpha = torch.full((2, 3, 2, 64), float(core.delayed_merge_rate(4.0, 64, 8)))
    assert float(core.compression_loss(alpha, 4.0, merge_delay=8)) == pytest.approx(0, abs=1e-6)


def test_bad_merge_delay_is_a_clear_error():
    with pytest.raises(ValueError, match="merge_delay must be an integer >= 0"):
        dmc.DMCConfig(merge_delay=-1)
    from dmc.train.config import ConfigError, TrainConfig
    cfg = TrainConfig(model="m", data=["d"], out="o", seq_len=256, target_cr=8, merge_delay=32)
    with pytest.raises(ConfigError, match="merge_delay 32 keeps more raw tokens"):
        cfg.validate()


def test_study_retrofits_with_a_delay_and_matches_the_eviction_budget(tmp_path):
    """`dmc study` end to end with merge_delay: the retrofit trains and saves it, the evaluation counts the
    window's raw tokens in the realized CR, and H2O gets the budget matched to that CR."""
    import json
    import random

    from dmc.cli.main import main as cli
    from dmc.tiny import write_tiny_model_dir

    rng = random.Random(0)
    words = "heads merge keys into slots while values follow the same weights and the cache".split()
    for split, n in (("train", 20), ("heldout", 4)):
        (tmp_path / split).mkdir()
        for i in range(n):
            (tmp_path / split / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(90)) + ".\n")
    texts = [p.read_text() for p in sorted((tmp_path / "train").iterdir())]
    write_tiny_model_dir(tmp_path / "model", texts, vocab_size=120, hidden=32, layers=1, heads=4, kv_heads=2,
                         max_positions=128)
    out = tmp_path / "study"
    common = ["study", str(tmp_path / "model"), "--data", str(tmp_path / "train"), "--heldout",
              str(tmp_path / "heldout"), "--out", str(out), "--crs", "2",
              "--set", "zero_out_steps=1", "retrofit_steps=2", "finetune_steps=2", "seq_len=32",
              "micro_batch_size=2", "lr=1e-3", "eval_every=100", "tensorboard=false", "progress=false",
              "merge_delay=4", "--eval-windows", "2", "--eval-batch-size", "2"]
    # As experiments/real_model/run.sh runs it: the retrofit, then the baseline in another process.
    assert cli(common + ["--methods", "dmc", "--only", "dmc@2"]) == 0
    assert cli(common + ["--methods", "dmc", "h2o", "--only", "h2o@2"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    dmc_row = next(r for r in rows if r["method"] == "dmc")
    config = json.loads(next(out.glob("runs/*/model/config.json")).read_text())
    assert config["dmc"]["merge_delay"] == 4
    assert dmc_row["realized_cr"] <= 32 / 4  # the 4 raw tokens alone are slots
    matched = [r for r in rows if r["method"] == "h2o" and r.get("budget_kind") == "matched"]
    assert matched and matched[0]["budget_cr"] == pytest.approx(dmc_row["realized_cr"])
