"""The delayed-merging Triton kernels (dmc.kernels.triton_delayed) against their PyTorch twins
(``delayed_decode_update_ref``, ``delayed_decode_attention_ref``). Without a GPU they run in Triton's
interpreter, as in test_kernels.py (whose fixtures build the random cache)."""

import pytest
import torch
from test_kernels import (DEVICE, HEADS, LAYERS, PAD_ROW, P, allocate_pages_ref, batch_rows, interpreter, make_cache,
                          projections, ragged_lengths, rope_tables, tolerance)

from dmc.kernels.reference import delayed_decode_attention_ref, delayed_decode_update_ref

pytest.importorskip("triton")
with interpreter():
    from dmc.kernels import triton_delayed


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    with interpreter():
        yield


def delay_ring(gen, rows: int, d: int, delay: int, dtype) -> dict:
    """A random delay ring ``{delay_kv, delay_aw, delay_rope}`` for ``rows`` sequence rows + the scratch row:
    keys with channel D-1 zeroed, hard α (about half merges), ω in (0.1, 1), RoPE tables of random positions."""
    kv = torch.randn(LAYERS, rows + 1, HEADS, delay, 2 * d, generator=gen)
    kv[..., d - 1] = 0
    aw = torch.stack([(torch.rand(LAYERS, rows + 1, HEADS, delay, generator=gen) < 0.5).float(),
                      torch.rand(LAYERS, rows + 1, HEADS, delay, generator=gen) * 0.9 + 0.1], -1)
    cos, sin = rope_tables(torch.randint(0, 200, ((rows + 1) * delay,), generator=gen), d)
    tables = torch.stack([cos, sin], 1).view(rows + 1, delay, 2, d)
    return dict(delay_kv=kv.to(DEVICE, dtype), delay_aw=aw.to(DEVICE), delay_rope=tables.to(DEVICE, dtype))


@pytest.mark.parametrize("d, groups, window, delay, dtype", [
    pytest.param(16, 1, 4, 1, torch.float32, id="mha-w1"),
    pytest.param(16, 2, 4, 3, torch.float32, id="gqa-w3"),
    pytest.param(32, 2, None, 3, torch.float32, id="gqa-unbounded-w3"),
    pytest.param(16, 1, 12, 8, torch.float32, id="mha-window12-w8"),
    pytest.param(16, 2, None, 8, torch.float32, id="gqa-unbounded-w8"),
    pytest.param(32, 1, 4, 3, torch.bfloat16, id="bf16-w3"),
])
def test_delayed_step_matches_twins(d, groups, window, delay, dtype):
    """w + 3 decode steps (alternating layers, so tokens written by the kernel leave it again) over ragged heads
    that cross page boundaries: a padding row, an empty sequence (positions < w: nothing leaves yet), merges.
    After each step the update's outputs, the whole cache and the attention output agree with the twins."""
    gen = torch.Generator().manual_seed(100 * delay + 10 * d + groups)
    rows = 5
    seq_ids = batch_rows(rows)
    lens = ragged_lengths(gen, rows, [0, 1, 15, 16, 17, 40])
    ring_width = 1 if window is None else window - 1
    twin = make_cache(lens, d, ring_width, dtype, gen)
    twin_delay = delay_ring(gen, rows, d, delay, dtype)
    cache, cache_delay = twin.clone(), {name: t.clone() for name, t in twin_delay.items()}
    pos = lens.amax(dim=(0, 2))[seq_ids.clamp_min(0).long()] + delay + torch.randint(0, 3, (len(seq_ids),),
                                                                                       generator=gen)
    pos[seq_ids == rows - 1] = 0  # a new sequence: its first w steps commit nothing
    pos[seq_ids == 1] = 1 if delay > 1 else pos[seq_ids == 1]  # one more row still filling its ring
    pos = pos.int()
    seq_dev = seq_ids.to(DEVICE)
    options = dict(init_offset=0.5, window=window, page_size=P)
    alphas, committed = [], 0
    for step in range(delay + 3):
        layer = step % LAYERS
        q, k, v = projections(gen, len(seq_ids), groups, d, dtype)
        cos, sin = (t.to(device=DEVICE, dtype=dtype) for t in rope_tables(pos, d))
        leave_cos, leave_sin = (t.to(device=DEVICE, dtype=dtype) for t in rope_tables((pos - delay).clamp_min(0), d))
        rows_here = torch.where(seq_ids >= 0, seq_ids.long(), rows).to(DEVICE)
        for ring in (twin_delay, cache_delay):  # the runner writes the new tokens' tables once per step
            ring["delay_rope"][rows_here, (pos.long() % delay).to(DEVICE)] = torch.stack([cos, sin], 1)
        batch = (q, k, v, cos, sin, leave_cos, leave_sin, seq_dev, pos.to(DEVICE), layer)
        before = cache.lens.clone()
        q_twin, alpha_twin = delayed_decode_update_ref(*batch, *twin.tensors()[:7], twin_delay["delay_kv"],
                                                       twin_delay["delay_aw"], **options)
        q_rot, alpha = triton_delayed.delayed_decode_update(*batch, *cache.tensors()[:7], cache_delay["delay_kv"],
                                                            cache_delay["delay_aw"], **options)
        assert torch.equal(alpha, alpha_twin)
        torch.testing.assert_close(q_rot, q_twin, **tolerance(dtype))
        cache.assert_close(twin, **tolerance(dtype))
        assert torch.equal(cache_delay["delay_kv"], twin_delay["delay_kv"])  # copies, never rounded
        assert torch.equal(cache_delay["delay_aw"][..., 0], twin_delay["delay_aw"][..., 0])  # α
        torch.testing.assert_close(cache_delay["delay_aw"], twin_delay["delay_aw"], rtol=1e-6, atol=1e-6)  # ω
        committed += int((cache.lens != before).sum())

        attention = (q_twin, twin.k_pool, twin.v_pool, twin.page_table, twin.lens, seq_dev, pos.to(DEVICE), layer,
                     d ** -0.5, P, twin_delay["delay_kv"], twin_delay["delay_rope"])
        expected = delayed_decode_attention_ref(*attention)
        # Triton's interpreter multiplies bf16 dot operands as integers: CUDA-core sums there
        sums = dtype == torch.bfloat16 and DEVICE == "cpu"
        out = triton_delayed.delayed_decode_attention(*attention, num_splits=1 + step % 2,
                                                      use_dot=False if sums else None)
        torch.testing.assert_close(out, expected, **tolerance(dtype))
        assert (out[seq_ids == PAD_ROW] == 0).all()
        for c in (twin, cache):
            allocate_pages_ref(c.lens, c.page_table, seq_dev, c.free_pages, c.free_top, P)
        alphas.append(alpha.cpu())
        pos += 1

    # what the test meant to cover did happen: merges and appends decided, slots committed (some pages filled)
    alphas = torch.stack(alphas)[:, seq_ids >= 0]
    assert (alphas == 1).any() and (alphas == 0).any()
    assert committed > 0
    assert (cache.lens.cpu() // P > lens // P).any() or (lens % P == 0).any()


@pytest.mark.parametrize("d, groups, delay, num_splits", [
    pytest.param(16, 1, 1, 3, id="mha-w1"),
    pytest.param(32, 2, 3, None, id="gqa-w3"),
    pytest.param(16, 2, 8, 1, id="gqa-w8-one-split"),
])
def test_delayed_attention_long_heads(d, groups, delay, num_splits):
    """Attention alone over heads up to 8 pages (several splits) plus the raw window; rows whose position is
    below w see only part of their ring."""
    gen = torch.Generator().manual_seed(7 * delay + d)
    rows = 5
    seq_ids = batch_rows(rows)
    cache = make_cache(ragged_lengths(gen, rows, [0, 1, 15, 16, 17, 40, 100, 127]), d, 1, torch.float32, gen)
    ring = delay_ring(gen, rows, d, delay, torch.float32)
    pos = torch.tensor([200, 0, 5, 1, 2, 300], dtype=torch.int32)
    q = torch.randn(len(seq_ids), HEADS * groups, d, generator=gen).to(DEVICE)
    args = (q, cache.k_pool, cache.v_pool, cache.page_table, cache.lens, seq_ids.to(DEVICE), pos.to(DEVICE), 1,
            d ** -0.5, P, ring["delay_kv"], ring["delay_rope"])
    expected = delayed_decode_attention_ref(*args)
    out = triton_delayed.delayed_decode_attention(*args, num_splits=num_splits)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[seq_ids == PAD_ROW] == 0).all()
