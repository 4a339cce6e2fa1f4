"""The pure DMC functions (spec §1-§5, check §7.2)."""

import math

import pytest
import torch

from dmc import core


def _random_alpha(shape, merge_rate=0.6, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if soft:
        return torch.rand(shape, generator=g)
    alpha = (torch.rand(shape, generator=g) < merge_rate).float()
    alpha[..., 0] = 0
    return alpha


@pytest.mark.parametrize("window", [12, 3, 1, None])
@pytest.mark.parametrize("soft", [False, True])
def test_closed_form_pooling_equals_recursion(window, soft):
    alpha = _random_alpha((2, 3, 40), merge_rate=0.85, soft=soft)
    terms = torch.randn(2, 3, 40, 9, dtype=torch.float64)
    closed = core.window_pool(alpha.double(), terms, window)
    recursive = core.window_pool_recursive(alpha.double(), terms, window)
    torch.testing.assert_close(closed, recursive, rtol=1e-12, atol=1e-12)


def _slots_by_spec(alpha, k, v, w, window):
    """§2 literally, for one head: a list of slots, each the windowed weighted mean of its group."""
    slots, group = [], []
    for t in range(len(alpha)):
        if alpha[t] == 0:
            group = []
            slots.append(None)
        group = (group + [t])[-window:] if window else group + [t]
        z = sum(w[j] for j in group)
        slots[-1] = (sum(w[j] * k[j] for j in group) / z, sum(w[j] * v[j] for j in group) / z)
        yield t, slots[-1]


@pytest.mark.parametrize("window", [12, 4, None])
def test_hard_pooling_equals_slot_semantics(window):
    length, d = 60, 5
    alpha = _random_alpha((length,), merge_rate=0.8, seed=3)
    k, v = torch.randn(length, d, dtype=torch.float64), torch.randn(length, d, dtype=torch.float64)
    w = torch.rand(length, dtype=torch.float64) + 0.1
    k_bar, v_bar = core.normalise(core.window_pool(alpha.double(), core.weighted_terms(w, k, v).double(), window), d)
    longest = max(core_len for core_len in _group_lengths(alpha))
    assert window is None or longest > window, "the test needs groups longer than the window"
    for t, (slot_k, slot_v) in _slots_by_spec(alpha.tolist(), k, v, w, window):
        torch.testing.assert_close(k_bar[t], slot_k)
        torch.testing.assert_close(v_bar[t], slot_v)


def _group_lengths(alpha):
    runs, run = [], 0
    for a in alpha.tolist():
        if a == 0 and run:
            runs.append(run)
            run = 0
        run += 1
    return runs + [run]


def test_split_decision_channel_reads_and_zeroes_channel():
    q = torch.randn(2, 4, 7, 8)  # 4 query heads, 2 KV heads (G = 2)
    k = torch.randn(2, 2, 7, 8)
    q0, k0, logits, importance = core.split_decision_channel(q, k, init_offset=5.0)
    assert torch.all(q0[..., -1] == 0) and torch.all(k0[..., -1] == 0)
    torch.testing.assert_close(q0[..., :-1], q[..., :-1])
    torch.testing.assert_close(logits, k[..., -1] - 5.0)
    group_mean = q[..., -1].view(2, 2, 2, 7).mean(2)
    torch.testing.assert_close(importance, torch.sigmoid(group_mean + 5.0) + 2 ** -7)


def test_hard_decisions_force_append_at_starts():
    logits = torch.ones(1, 2, 6)
    starts = torch.tensor([[True, False, False, True, False, False]])
    alpha = core.hard_decisions(logits, starts)
    assert alpha[0, 0].tolist() == [0, 1, 1, 0, 1, 1]
    assert core.hard_decisions(logits)[0, 1].tolist() == [0, 1, 1, 1, 1, 1]


def test_straight_through_is_hard_forward_soft_backward():
    soft = torch.tensor([0.2, 0.7, 0.5, 0.51], requires_grad=True)
    hat = core.straight_through(soft)
    assert hat.tolist() == [0.0, 1.0, 0.0, 1.0]
    hat.sum().backward()
    assert soft.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_relaxed_key_bias_is_log_one_minus_next_alpha():
    x = torch.randn(1, 1, 6, dtype=torch.float64) * 3
    forced = torch.tensor([[[True, False, False, True, False, False]]])
    bias = core.key_bias_from_relaxed(x, forced)
    alpha = torch.sigmoid(x).masked_fill(forced, 0)
    expected = torch.log1p(-torch.cat([alpha[..., 1:], torch.zeros(1, 1, 1, dtype=torch.float64)], -1))
    torch.testing.assert_close(bias, expected)
    dense = core.dense_bias(bias)
    assert dense.shape == (1, 1, 6, 6)
    assert torch.isinf(dense[0, 0, 1, 2]) and dense[0, 0, 2, 2] == 0 and dense[0, 0, 4, 1] == bias[0, 0, 1]


def test_dense_bias_blocks_other_documents():
    bias = torch.zeros(1, 1, 4)
    docs = torch.tensor([[0, 0, 1, 1]])
    allowed = torch.isfinite(core.dense_bias(bias, docs))[0, 0]
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [False, False, True, False], [False, False, True, True]]


def test_compression_loss_is_one_sided():
    alpha_hat = torch.zeros(2, 3, 4, 10)
    alpha_hat[0] = 1.0  # sequence 0 merges everything: more than enough for CR 2
    loss = core.compression_loss(alpha_hat, target_cr=2.0)
    # sequence 0: max(0, 0.5 - 1) = 0; sequence 1: max(0, 0.5 - 0) = 0.5; mean 0.25
    assert math.isclose(float(loss), 0.25)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :5] = False
    alpha_hat[1, ..., :5] = 1.0  # padding must not count as compression
    assert math.isclose(float(core.compression_loss(alpha_hat, 2.0, valid)), 0.25)


def test_schedules():
    assert core.cr_schedule(0, 4.0, 100) == 1.0
    assert core.cr_schedule(50, 4.0, 100) == 2.5
    assert core.cr_schedule(500, 4.0, 100) == 4.0
    with pytest.raises(ValueError, match=">= 1"):
        core.cr_schedule(0, 0.5, 10)
    assert core.zero_out_scale(0, 250) == 1.0
    assert math.isclose(core.zero_out_scale(100, 250), 0.5)
    assert core.zero_out_scale(200, 250) == 0.0 and core.zero_out_scale(250, 250) == 0.0
    assert math.isclose(float(core.cr_from_alpha(0.75)), 4.0)


@pytest.mark.parametrize("window", [5, None])
def test_next_window_state_holds_the_open_group(window):
    alpha = _random_alpha((1, 1, 30), merge_rate=0.7, seed=5)
    terms = torch.randn(1, 1, 30, 3, dtype=torch.float64)
    width = 1 if window is None else window - 1
    prefix = torch.zeros(1, 1, width, 3, dtype=torch.float64)
    sums = core.window_pool(alpha.double(), terms, window)
    state = core.next_window_state(alpha.double(), terms, window, prefix, sums)
    # decoding one more merging token from the state equals pooling the whole sequence
    extra = torch.randn(1, 1, 1, 3, dtype=torch.float64)
    ones = torch.ones(1, 1, 1, dtype=torch.float64)
    step = core.window_pool(torch.cat([ones.expand(1, 1, width), ones], -1), torch.cat([state, extra], -2), window)
    whole = core.window_pool(torch.cat([alpha.double(), ones], -1), torch.cat([terms, extra], -2), window)
    torch.testing.assert_close(step[..., -1, :], whole[..., -1, :])
