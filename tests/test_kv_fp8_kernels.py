"""FP8 (e4m3) page pools in the decode kernels (the kernels and their twins; the engine's
``kv_cache_dtype="fp8"`` is tested in test_kv_fp8.py). The Triton decode update and paged attention against their PyTorch
twins with fp8 pools and per-layer k/v scales, merges happening; the kernel's own rounding to the e4m3
grid against torch's cast. Without a GPU in Triton's interpreter, as test_kernels.py."""

import pathlib
import sys

import pytest
import torch
from test_kernels import (DEVICE, HEADS, LAYERS, PAD_ROW, P, allocate_pages_ref, batch_rows, interpreter, make_cache,
                          projections, ragged_lengths, rope_tables)

from dmc.kernels import reference as R

pytest.importorskip("triton")
with interpreter():
    import triton
    import triton.language as tl

    from dmc.kernels import triton_kernels as T

FP8 = torch.float8_e4m3fn
# One per (layer, KV head), all different: a kernel that read another head's or layer's scale would disagree.
K_SCALE = torch.linspace(0.25, 2.0, LAYERS * HEADS).reshape(LAYERS, HEADS)
V_SCALE = torch.linspace(1.5, 0.125, LAYERS * HEADS).reshape(LAYERS, HEADS)


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    with interpreter():
        yield


def fp8_cache(gen, lens, d: int, ring_width: int):
    """test_kernels' random cache with its pools stored as e4m3 (the window state stays fp32)."""
    cache = make_cache(lens, d, ring_width, torch.float32, gen)
    cache.k_pool, cache.v_pool = cache.k_pool.to(FP8), cache.v_pool.to(FP8)
    return cache


def test_kernel_rounding_to_e4m3_equals_torchs_cast():
    """The kernel rounds to the e4m3 grid itself (the interpreter's cast mis-rounds where the mantissa carries
    into the exponent); with a scale, across normals, subnormals and the clamp at ±448: the same values (the
    kernel flushes values below half the smallest subnormal to +0 where torch keeps -0)."""
    if DEVICE != "cpu":
        pytest.skip("checks the interpreter workaround")
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1 << 12, generator=gen) * 100, torch.randn(1 << 12, generator=gen) * 1e-2,
                   torch.tensor([7.99, -7.99, 1e4, -1e4, 0.0, 2.0 ** -9, 2.0 ** -10])])
    n = triton.next_power_of_2(x.numel())
    x = torch.nn.functional.pad(x, (0, n - x.numel()))
    y = torch.empty_like(x, dtype=FP8)

    @triton.jit
    def store(x_ptr, y_ptr, s_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(y_ptr + i, T._to_pool(tl.load(x_ptr + i), s_ptr, 0, y_ptr.dtype.element_ty, True))

    store[(1,)](x, y, torch.tensor([0.7]), N=n)
    want = R.quantise(x, FP8, torch.tensor(0.7))
    assert torch.equal(y.float(), want.float())


@pytest.mark.parametrize("d, groups, window", [(16, 1, 4), (32, 2, None), (16, 2, 12)])
def test_fp8_decode_update_matches_twin_with_merges(d, groups, window):
    """Four decode steps over ragged heads with fp8 pools: the same decisions, the same stored slots (bit
    for bit: both quantise the slot built from the exact window state), the same window state."""
    gen = torch.Generator().manual_seed(7 + d + groups)
    rows = 5
    seq_ids = batch_rows(rows)
    lens = ragged_lengths(gen, rows, [0, 1, 15, 16, 17, 40])
    twin = fp8_cache(gen, lens, d, 1 if window is None else window - 1)
    cache = twin.clone()
    pos = lens.amax(dim=(0, 2))[seq_ids.clamp_min(0).long()].int() + 1
    pos[seq_ids == rows - 1] = 0
    options = dict(init_offset=0.5, window=window, vanilla=False, page_size=P, k_scale=K_SCALE.to(DEVICE),
                   v_scale=V_SCALE.to(DEVICE))
    merged = 0.0
    for step in range(4):
        layer = step % LAYERS
        q, k, v = projections(gen, len(seq_ids), groups, d, torch.float32)
        cos, sin = (t.to(DEVICE) for t in rope_tables(pos, d))
        batch = (q, k, v, cos, sin, seq_ids.to(DEVICE), pos.to(DEVICE), layer)
        q_twin, alpha_twin = R.decode_update_ref(*batch, *twin.tensors()[:7], **options)
        q_rot, alpha = T.decode_update(*batch, *cache.tensors()[:7], **options)
        assert torch.equal(alpha, alpha_twin)
        torch.testing.assert_close(q_rot, q_twin, rtol=1e-5, atol=1e-5)
        assert cache.k_pool.dtype == FP8 and torch.equal(cache.lens, twin.lens)
        # A one-ulp difference in the fp32 slot can round to the neighbouring e4m3 value: compare as values.
        for got, want, scale in ((cache.k_pool, twin.k_pool, K_SCALE[layer].max()),
                                  (cache.v_pool, twin.v_pool, V_SCALE[layer].max())):
            torch.testing.assert_close(got.float(), want.float(), rtol=0.07, atol=2.0 ** -9 * float(scale))
            assert (got.view(torch.uint8) != want.view(torch.uint8)).float().mean() < 1e-3
        torch.testing.assert_close(cache.ring, twin.ring, rtol=1e-5, atol=1e-5)
        for c in (twin, cache):
            allocate_pages_ref(c.lens, c.page_table, seq_ids.to(DEVICE), c.free_pages, c.free_top, P)
        merged = max(merged, float(alpha[seq_ids >= 0].mean()))
        pos += 1
    assert merged > 0.2  # merges happened


def fp8_attention_case(seed: int, d: int, groups: int):
    """Ragged fp8 pools (one layer's worth of heads, 5 rows and a padding row) and random fp32 queries:
    ``(seq_ids, args, scales)`` for ``paged_decode_attention`` and its twin, at layer 1."""
    gen = torch.Generator().manual_seed(seed)
    rows = 5
    seq_ids = batch_rows(rows)
    cache = fp8_cache(gen, ragged_lengths(gen, rows, [0, 1, 15, 16, 17, 40, 100, 127]), d, 1)
    q = torch.randn(len(seq_ids), HEADS * groups, d, generator=gen).to(DEVICE)
    args = (q, cache.k_pool, cache.v_pool, cache.page_table, cache.lens, seq_ids.to(DEVICE), 1, d ** -0.5, P)
    return seq_ids, args, dict(k_scale=K_SCALE.to(DEVICE), v_scale=V_SCALE.to(DEVICE))


@pytest.mark.parametrize("d, groups, sums", [(16, 1, {}), (32, 2, {}), (32, 1, {"use_dot": False, "defer_sums": False}),
                                             (32, 1, {"use_dot": False, "defer_sums": True})],
                         ids=["mha", "gqa", "mha-cuda-core-sums", "mha-deferred-sums"])
def test_fp8_paged_attention_matches_twin(d, groups, sums):
    """fp8 pools with per-layer scales: Triton == twin (which dequantises to fp32), with the dots or the
    CUDA-core sums."""
    seq_ids, args, scales = fp8_attention_case(3 * d + groups, d, groups)
    expected = R.paged_decode_attention_ref(*args, **scales)
    out = T.paged_decode_attention(*args, **scales, **sums)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[seq_ids == PAD_ROW] == 0).all()
    # The scales matter: the same pools read at scale 1 give another answer.
    assert not torch.allclose(out, R.paged_decode_attention_ref(*args), atol=1e-3)


@pytest.mark.parametrize("d, groups", [(16, 1), (32, 2)])
def test_fp8_pages_read_in_fp16_match_twin(d, groups):
    """The engine's read of fp8 pages for 16-bit queries (:func:`fp8_read_dtype`: fp16, exact for every e4m3
    value; queries and probabilities rounded to fp16): equal to the twin within fp16 rounding, also for a
    query beyond fp16's range (clamped, not inf). Forced here with fp32 queries, which the interpreter computes
    right; on a GPU the engine's bf16 queries take this path by default."""
    assert T.fp8_read_dtype(torch.bfloat16) == torch.float16 and T.fp8_read_dtype(torch.float32) == torch.float32
    _, args, scales = fp8_attention_case(11 * d + groups, d, groups)
    q = args[0]
    out = T.paged_decode_attention(*args, **scales, read_dtype=torch.float16)
    torch.testing.assert_close(out, R.paged_decode_attention_ref(*args, **scales), rtol=2e-2, atol=2e-2)
    q[0, 0, 0] = 1e6  # beyond fp16's 65504: clamped, the output stays finite
    assert torch.isfinite(T.paged_decode_attention(*args, **scales, read_dtype=torch.float16)).all()


def test_attention_sweep_tiles_all_agree_with_the_twin():
    """benchmarks/attention_sweep.py (GPU only to time): every tile it tries (block_tokens) computes what the twin
    does, so the sweep's fastest row is a correct configuration. On CUDA: bf16 queries over bf16 and fp8 pages,
    the engine's combination; Triton's CPU interpreter computes only fp32 right, so there fp32 queries over fp8."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import attention_sweep

    cuda = DEVICE == "cuda"
    dtypes = ("bf16", "fp8") if cuda else ("fp8",)
    rows = attention_sweep.sweep(3, 2, 40, [16, 64], [None], dtypes=dtypes, device=DEVICE, warps=[4, 8],
                                 splits=[None, 3], q_dtype=torch.bfloat16 if cuda else torch.float32,
                                 timer=lambda fn: (fn(), 1.0)[1], modes=list(attention_sweep.MODES))
    assert [(r["dtype"], r["mode"], r["block_tokens"], r["num_warps"]) for r in rows] == [
        (d, m, b, w) for d in dtypes for m in attention_sweep.MODES for b in (16, 64) for w in (4, 8) for _ in range(2)]
    # None: the engine's default_splits (at 6 rows: one split per page of the widest table)
    assert sorted({r["num_splits"] for r in rows})[0] == 3 and len({r["num_splits"] for r in rows}) == 2
    tolerance = 3e-2 if cuda else 1e-5  # bf16 outputs on the GPU
    assert all("error" not in r and r["max_abs_err_vs_twin"] < tolerance for r in rows), rows
    read = "float16" if cuda else "float32"  # the engine reads fp8 as fp16 for bf16 queries
    assert f"| 3 | 38 | fp8 | {read} | defer | 64 | None | 8 | 3 |" in attention_sweep.report(rows, {"gpu": "cpu", "command": "test",
                                                                               "heads": 2})


@pytest.mark.parametrize("contiguous", [False, True], ids=["scattered", "one-run-per-head"])
def test_attention_sweep_large_pool_places_pages_as_asked(contiguous):
    """attention_sweep.py's --pool-gib / --contiguous cache: a pool larger than the pages used, the table pointing
    only at filled pages (each head's in one run when asked), and the kernel over it equal to the twin."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import attention_sweep

    q, k_pool, v_pool, table, lens, seq_ids = attention_sweep.ragged_cache(
        3, 2, 40, torch.float32, device=DEVICE, q_dtype=torch.float32, pool_gib=2 ** -8, contiguous=contiguous)
    held = (lens.long() // 16 + 1)[0]  # pages per head
    assert k_pool.shape[0] > int(held.sum()) + 1  # the pool is larger than the pages used
    pages = table[0][torch.arange(table.shape[-1], device=DEVICE) < held[..., None]]
    assert pages.unique().numel() == pages.numel() and int(pages.min()) >= 1
    if contiguous:  # each head's pages, then the next head's: one run from page 1
        assert torch.equal(pages, torch.arange(1, pages.numel() + 1, dtype=pages.dtype, device=DEVICE))
    else:
        assert int(pages.max()) > pages.numel()  # spread beyond the first pages
    args = (q, k_pool, v_pool, table, lens, seq_ids, 0, 128 ** -0.5, 16)
    torch.testing.assert_close(T.paged_decode_attention(*args), R.paged_decode_attention_ref(*args), rtol=1e-5,
                               atol=1e-5)
