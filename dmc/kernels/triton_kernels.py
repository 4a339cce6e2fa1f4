"""Triton kernels of the decode step: the fused cache update and paged split-K decode attention.

Each kernel computes exactly what its PyTorch twin in :mod:`.reference` computes (the twins' docstrings
define the cache layout). The wrappers never read device memory on the host and allocate only
data-independent shapes, so a decode step built from them can be captured in a CUDA graph.

Cache tensors (pools, page table, lens, ring) are updated in place and must be contiguous; the
kernels index them from their shapes, which makes the page stride a compile-time constant (aligned,
vectorised loads). q/k/v may be strided views of a projection output (last dim contiguous).

FP8 pools (``torch.float8_e4m3fn``, ``kv_cache_dtype="fp8"``): the update stores ``clamp(x / scale, ±448)``
as e4m3, attention reads e4m3 (exact in the query dtype) and applies the (layer, KV head)'s scales to the scores
and the output; ``k_scale``/``v_scale`` fp32 ``[L, H]`` (None = 1.0), as the twins define.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import core

# Paged attention tiling: slots per inner iteration (a whole number of pages; half for D > 128, to
# keep the [slots, D] tiles in registers) and the most splits of one head's pages. Tuning knobs for
# the GPU; any value gives the same result.
# Measured on an H100 (docs/benchmarks.md): tensor-core dots even for MHA (queries padded to 16 rows;
# wasted FLOPs are free in a memory-bound kernel, and dots get cp.async pipelining), 128-slot tiles, and
# only as many splits as needed to fill the GPU: 2.8-3.0 TB/s vs 2.4 with CUDA-core sums and 16 splits.
ATTENTION_BLOCK_TOKENS = 128
# fp8 pages with MHA take the CUDA-core sums kept per slot row, over 32-slot tiles: on an H200 at the CR 4 + fp8
# batch (397 rows x 32 heads, ~900 slots) 0.93 ms a layer (3.1 TB/s) against 1.22 (2.4 TB/s) for the tensor-core
# dots, whose fp8 -> fp16 conversion goes through shared memory (attention_sweep_modes.md in
# docs/throughput_runs/h200_engine/ at commit 3374748); bf16 pages stay on the dots (4.3 TB/s against 3.6). Not
# faster there (commit 49e19d5; attention_sweep_fp8_convert.md and _e4m3_dot.md, same place): e4m3 -> fp32 by
# integer ops, a lazy rescale, e4m3 dots.
FP8_SUMS_BLOCK_TOKENS = 32
MAX_SPLITS = 16
ROWS_PER_WAVE = 2048  # (row, KV head) programs that keep an H100 busy with one split each


# --------------------------------------------------------------------------- shared helpers
@triton.jit
def _rope(x, cos, sin, side):
    """Rotate-half RoPE of head vectors laid out as ``[N, 2, D/2]`` (halves on axis 1).

    Keeping the halves on their own axis turns rotate_half into two masked sums over a size-2 axis,
    with no shuffles of the head dimension.
    """
    lo = tl.sum(tl.where(side == 0, x, 0.0), axis=1, keep_dims=True)
    hi = tl.sum(tl.where(side == 0, 0.0, x), axis=1, keep_dims=True)
    return x * cos + tl.where(side == 0, -hi, lo) * sin


@triton.jit
def _fp8_grid(x):
    """fp32 ``x`` (|x| <= 448) rounded to the nearest e4m3 value, ties to even, so the cast to e4m3 that
    follows is exact. On the GPU this equals the hardware cast; it is here because Triton's CPU interpreter
    rounds fp32 → e4m3 wrongly where rounding carries into the exponent (7.99 → 4 instead of 8).
    Normals: round the fp32 mantissa to 3 bits (the carry moves into the exponent); subnormals (below
    2^-6): to multiples of 2^-9 by adding and subtracting 1.5·2^14 (whose fp32 ulp is 2^-9)."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


@triton.jit
def _to_pool(x, scale_ptr, scale_index, dtype: tl.constexpr, FP8: tl.constexpr):
    """fp32 ``x`` as pool elements: a cast, or for fp8 ``clamp(x / scale, ±448)`` as e4m3 with the scale at
    ``scale_index`` (``layer * H + head`` of ``[L, H]``; the twin's :func:`.reference.quantise`)."""
    if FP8:
        x = x / tl.load(scale_ptr + scale_index)
        x = _fp8_grid(tl.minimum(tl.maximum(x, -448.0), 448.0))
    return x.to(dtype)


def _scales(scale: torch.Tensor | None, layer: int, heads: int, device) -> torch.Tensor:
    """The ``[L, H]`` scales for the kernels, checked (None: ones, a data-independent allocation)."""
    if scale is None:
        return torch.ones(layer + 1, heads, dtype=torch.float32, device=device)
    if scale.dim() != 2 or scale.shape[1] != heads or scale.shape[0] <= layer or scale.dtype != torch.float32 \
            or not scale.is_contiguous():
        raise ValueError(f"fp8 scales must be contiguous fp32 [num_layers, num_kv_heads={heads}] covering layer "
                         f"{layer}, got {scale.dtype} {tuple(scale.shape)}")
    return scale


def _pool_args(q, k_pool, k_scale, v_scale, layer: int, heads: int) -> dict:
    """The kernel arguments that follow from the pools' dtype: ``FP8`` and the (layer, KV head) scales."""
    fp8 = k_pool.dtype == torch.float8_e4m3fn
    if not fp8:  # never read: no check, and the tensors of the graph-captured step stay what they are
        ones = torch.ones(1, dtype=torch.float32, device=q.device) if k_scale is None else k_scale
        return dict(k_scale_ptr=ones, v_scale_ptr=ones if v_scale is None else v_scale, FP8=False)
    return dict(k_scale_ptr=_scales(k_scale, layer, heads, q.device),
                v_scale_ptr=_scales(v_scale, layer, heads, q.device), FP8=True)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def fp8_read_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """The dtype fp8 pages are read in (the dots' operands): fp16 for 16-bit queries, since e4m3 -> fp16 is one
    exact conversion instruction where e4m3 -> bf16 goes through fp32 (e4m3 values are all exact in fp16, and
    queries and probabilities lose less in fp16 than in bf16); fp32 queries read in fp32."""
    return torch.float32 if q_dtype == torch.float32 else torch.float16


def _attention_pool_args(q, k_pool, k_scale, v_scale, layer: int, heads: int,
                         read_dtype: torch.dtype | None = None) -> dict:
    """:func:`_pool_args` plus the dtype fp8 pages are read in (``read_dtype``, default :func:`fp8_read_dtype`)
    and the dots' precision of the split stage: exact (ieee) when its operands are fp32 (fp32 pools, or fp8
    pools read in fp32), else tf32."""
    args = _pool_args(q, k_pool, k_scale, v_scale, layer, heads)
    read = (read_dtype or fp8_read_dtype(q.dtype)) if args["FP8"] else k_pool.dtype
    return {**args, "READ": _TL_DTYPES[read], "PRECISION": "ieee" if read == torch.float32 else "tf32"}


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (a view of a projection output is fine), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(*tensors: torch.Tensor) -> None:
    """The kernels index cache tensors from their shapes; they are written in place, so no copy."""
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("cache tensors must be contiguous")


# --------------------------------------------------------------------------- decode update
@triton.jit
def _decision(q, k, t, group_rows, last, init_offset, forced_period, G: tl.constexpr, FLOOR: tl.constexpr):
    """α (before skipping) and ω of one KV head from channel D-1 of its key and its G queries."""
    logit = tl.sum(tl.where(last, k, 0.0)) - init_offset
    alpha = (logit > 0).to(tl.float32)
    period = tl.maximum(forced_period, 1)
    alpha = tl.where(forced_period > 0, (t % period != 0).to(tl.float32), alpha)
    alpha = tl.where(t == 0, 0.0, alpha)
    q_last = tl.sum(tl.where(last & group_rows, q, 0.0)) / G
    weight = tl.sigmoid(q_last + init_offset) + FLOOR
    return alpha, weight


@triton.jit
def _window_sums(ring_ptr, ring_kv_ptr, ring_w_ptr, k, v, weight, alpha, t, dims,
                 D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, UNBOUNDED: tl.constexpr):
    """The open group's sums [K, V, Z] (this token's terms, plus the ring's on a merge) and the ring
    update. α is 0 or 1, so branching on it equals the twin's scaling by α.

    Windowed: the ring holds the group's last R tokens as raw k, v (cache dtype: exactly the
    projection outputs) and their ω in fp32 (0 outside the group); ω·k is formed here in fp32, the
    same products the sums always had. A merge reads the ring and replaces only entry t % R (the
    token leaving the window); an append zeroes the other ω and writes this token. Unbounded: one
    fp32 entry, the running sums themselves.
    """
    k_sum, v_sum, z_sum = weight * k, weight * v, weight
    if UNBOUNDED:
        if alpha > 0:
            k_sum += tl.load(ring_ptr + dims)
            v_sum += tl.load(ring_ptr + D + dims)
            z_sum += tl.load(ring_ptr + 2 * D)
        tl.store(ring_ptr + dims, k_sum)
        tl.store(ring_ptr + D + dims, v_sum)
        tl.store(ring_ptr + 2 * D, z_sum)
    else:
        r = tl.arange(0, R_PAD)
        rows = ring_kv_ptr + r[:, None, None] * (2 * D) + dims  # [R_PAD, 2, D/2]
        used = r < R
        here = ring_kv_ptr + (t % R) * (2 * D) + dims
        dtype = ring_kv_ptr.dtype.element_ty
        if alpha > 0:
            w_r = tl.load(ring_w_ptr + r, mask=used, other=0.0)
            w = w_r[:, None, None]
            # Only the group's entries (ω > 0; the others are 0) are read: at CR c about c - 1 of the R,
            # and an entry not read adds 0 · 0 where it added 0 · x, the same sum.
            group = (w_r > 0)[:, None, None]
            k_sum += tl.sum(w * tl.load(rows, mask=group, other=0.0).to(tl.float32), axis=0, keep_dims=True)
            v_sum += tl.sum(w * tl.load(rows + D, mask=group, other=0.0).to(tl.float32), axis=0, keep_dims=True)
            z_sum += tl.sum(w_r)
            tl.debug_barrier()  # every thread has read the entry that is overwritten next
            tl.store(ring_w_ptr + t % R, weight)
        else:
            tl.store(ring_w_ptr + r, tl.where(r == t % R, weight, 0.0), mask=used)
        tl.store(here, k.to(dtype))
        tl.store(here + D, v.to(dtype))
    return k_sum, v_sum, z_sum


@triton.jit(do_not_specialize=["layer", "forced_period"])
def _decode_update_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, seq_ptr, pos_ptr, q_out_ptr, alpha_ptr,
                          k_pool_ptr, v_pool_ptr, table_ptr, lens_ptr, ring_ptr, ring_kv_ptr, ring_w_ptr,
                          layer, init_offset, forced_period,
                          stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                          ROWS: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                          D: tl.constexpr, M: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, VANILLA: tl.constexpr, UNBOUNDED: tl.constexpr,
                          FLOOR: tl.constexpr, k_scale_ptr=None, v_scale_ptr=None, FP8: tl.constexpr = False):
    """One (batch row, KV head): decision, rotated queries, window sums, slot write and lens bump.

    Head vectors are ``[N, 2, D/2]`` tiles (see :func:`_rope`). A padding row (seq id -1) only
    rotates its queries and reports α = 0; it touches no cache entry.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    seq = tl.load(seq_ptr + b)
    t = tl.load(pos_ptr + b)
    side = tl.arange(0, 2)[None, :, None]
    dims = side * HALF + tl.arange(0, HALF)[None, None, :]  # [1, 2, D/2] channel index
    last = dims == D - 1
    g = tl.arange(0, G_PAD)[:, None, None]
    group_rows = g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + dims, mask=group_rows, other=0.0)
    q = q.to(tl.float32)  # [G_PAD, 2, D/2]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + dims).to(tl.float32)  # [1, 2, D/2]
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + dims).to(tl.float32)
    cos = tl.load(cos_ptr + b * D + dims).to(tl.float32)
    sin = tl.load(sin_ptr + b * D + dims).to(tl.float32)

    if VANILLA:
        alpha = tl.zeros([], tl.float32)
    else:
        alpha, weight = _decision(q, k, t, group_rows, last, init_offset, forced_period, G, FLOOR)
        q = tl.where(last, 0.0, q)
        k = tl.where(last, 0.0, k)
    q_rot = _rope(q, cos, sin, side)
    if not VANILLA:
        q_rot = tl.where(last, 0.0, q_rot)
    tl.store(q_out_ptr + (b * G * H + h * G + g) * D + dims, q_rot.to(q_out_ptr.dtype.element_ty), mask=group_rows)
    if seq < 0:
        tl.store(alpha_ptr + b * H + h, 0.0)
        return
    tl.store(alpha_ptr + b * H + h, alpha)

    head = (layer * ROWS + seq) * H + h  # index of this head in lens, page table and ring
    if VANILLA:  # every token is its own slot (ω = 1: the sums are the token)
        k_bar, v_bar = k, v
    else:
        head64 = head.to(tl.int64)
        k_sum, v_sum, z_sum = _window_sums(ring_ptr + head64 * (2 * D + 1), ring_kv_ptr + head64 * (R * 2 * D),
                                           ring_w_ptr + head64 * R, k, v, weight, alpha, t, dims,
                                           D, R, R_PAD, UNBOUNDED)
        z = tl.maximum(z_sum, 1e-30)
        k_bar = k_sum / z
        v_bar = v_sum / z
    k_rot = _rope(k_bar, cos, sin, side)
    if not VANILLA:
        k_rot = tl.where(last, 0.0, k_rot)

    old = tl.load(lens_ptr + head)
    slot = tl.where((alpha > 0.5) & (old > 0), old - 1, old)  # merge: overwrite the last slot
    page = tl.load(table_ptr + head.to(tl.int64) * M + slot // PAGE_SIZE)
    at = page.to(tl.int64) * (PAGE_SIZE * D) + (slot % PAGE_SIZE) * D + dims
    # Only this slot is quantised: on a merge it is rewritten from the fp32 sums, never read back.
    tl.store(k_pool_ptr + at, _to_pool(k_rot, k_scale_ptr, layer * H + h, k_pool_ptr.dtype.element_ty, FP8))
    tl.store(v_pool_ptr + at, _to_pool(v_bar, v_scale_ptr, layer * H + h, v_pool_ptr.dtype.element_ty, FP8))
    tl.store(lens_ptr + head, slot + 1)


def decode_update(q, k, v, cos, sin, seq_ids, pos, layer: int, k_pool, v_pool, page_table, lens, ring, ring_kv,
                  ring_w, *,
                  init_offset: float, window: int | None, vanilla: bool, page_size: int,
                  forced_period: int = 0, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`.reference.decode_update_ref` (same arguments and results)."""
    b, hq, d = q.shape
    h = k.shape[1]
    q, k, v = _rows(q), _rows(k), _rows(v)
    cos, sin = cos.contiguous(), sin.contiguous()
    _check_cache(k_pool, v_pool, page_table, lens, ring, ring_kv, ring_w, seq_ids, pos)
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    alpha = torch.empty(b, h, dtype=torch.float32, device=q.device)
    width = ring_w.shape[3]
    _decode_update_kernel[(b, h)](
        q, k, v, cos, sin, seq_ids, pos, q_rot, alpha, k_pool, v_pool, page_table, lens, ring, ring_kv, ring_w,
        layer, float(init_offset), int(forced_period),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROWS=lens.shape[1], H=h, G=hq // h, G_PAD=triton.next_power_of_2(hq // h), D=d,
        M=page_table.shape[-1], R=width, R_PAD=triton.next_power_of_2(width), PAGE_SIZE=page_size,
        VANILLA=vanilla, UNBOUNDED=window is None, FLOOR=core.IMPORTANCE_FLOOR,
        **_pool_args(q, k_pool, k_scale, v_scale, layer, page_table.shape[2]), num_warps=1)
    return q_rot, alpha


# --------------------------------------------------------------------------- paged attention
@triton.jit(do_not_specialize=["layer"])
def _attention_split_kernel(q_ptr, k_pool_ptr, v_pool_ptr, table_ptr, lens_ptr, seq_ptr, part_out_ptr, part_lse_ptr,
                            layer, scale_log2, stride_qb, stride_qh,
                            ROWS: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                            D: tl.constexpr, M: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGES: tl.constexpr,
                            SPLITS: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                            k_scale_ptr=None, v_scale_ptr=None, FP8: tl.constexpr = False,
                            READ: tl.constexpr = None, ACC_ROWS: tl.constexpr = 1, DIRECT: tl.constexpr = False):
    """Stage 1, one (batch row, KV head, split): the G queries of the group over a contiguous share
    of the head's pages, online softmax in fp32 (log2 domain).

    The head's length is read here, so the grid does not depend on it: a split past the head's end
    only writes lse = -inf. Each iteration loads PAGES whole pages as one
    ``[PAGES·P, D]`` tile. GQA groups (G > 1) use tensor-core dots with the queries padded to 16 rows;
    MHA (G = 1) may instead take a multiply-and-sum in fp32 on the CUDA cores (``USE_DOT`` False), whose
    probability-weighted values either reduce over the tile's slots every iteration (``ACC_ROWS`` 1) or
    accumulate per slot row in a ``[BLOCK, D]`` register tile that reduces once at the end (``ACC_ROWS`` =
    BLOCK: no cross-warp reduction in the loop). FP8 pools: e4m3 is converted to ``READ``
    (exactly; fp16 for 16-bit queries, which are clamped to its range), the layer's k scale folds into the
    score scale and its v scale into the output (one pair per (layer, KV head)). ``DIRECT`` (one split): write the normalised output itself
    (no partials, no reduce pass).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    BLOCK: tl.constexpr = PAGES * PAGE_SIZE
    seq = tl.load(seq_ptr + b)
    head = (layer * ROWS + tl.maximum(seq, 0)) * H + h
    length = tl.where(seq >= 0, tl.load(lens_ptr + head), 0)
    pages = tl.cdiv(length, PAGE_SIZE)
    share = tl.cdiv(tl.cdiv(pages, SPLITS), PAGES) * PAGES  # whole iterations per split
    first = split * share
    end = tl.minimum(first + share, pages)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    tok = tl.arange(0, BLOCK)
    q = tl.load(q_ptr + b * stride_qb + (h * G + g[:, None]) * stride_qh + d[None, :], mask=g[:, None] < G,
                other=0.0)
    table = table_ptr + head.to(tl.int64) * M
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    acc_rows = tl.zeros([ACC_ROWS, D], tl.float32)  # ACC_ROWS > 1: per-slot partial sums (G = 1, CUDA cores)
    if FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + layer * H + h)
        if READ == tl.float16:  # bf16 queries beyond fp16's range would become inf
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0)
    for p in range(first, end, PAGES):
        slot = p * PAGE_SIZE + tok
        valid = slot < length
        page = tl.load(table + slot // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        at = page[:, None] * (PAGE_SIZE * D) + (slot % PAGE_SIZE)[:, None] * D + d[None, :]
        keys = tl.load(k_pool_ptr + at, mask=valid[:, None], other=0.0)
        values = tl.load(v_pool_ptr + at, mask=valid[:, None], other=0.0)
        if FP8:
            keys = keys.to(READ)
            values = values.to(READ)
        if USE_DOT:
            scores = tl.dot(q.to(keys.dtype), tl.trans(keys), input_precision=PRECISION)
        else:
            scores = tl.sum(keys.to(tl.float32) * q.to(tl.float32), axis=1)[None, :]
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))  # [G_PAD, BLOCK]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        rescale = tl.exp2(m_i - m_new)
        probs = tl.exp2(scores - m_new[:, None])
        l_i = l_i * rescale + tl.sum(probs, axis=1)
        if USE_DOT:
            update = tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
            acc = acc * rescale[:, None] + update
        elif ACC_ROWS > 1:
            acc_rows = acc_rows * tl.max(rescale, axis=0) + tl.sum(probs, axis=0)[:, None] * values.to(tl.float32)
        else:
            update = tl.sum(tl.sum(probs, axis=0)[:, None] * values.to(tl.float32), axis=0)[None, :]
            acc = acc * rescale[:, None] + update
        m_i = m_new

    if ACC_ROWS > 1:
        acc = tl.sum(acc_rows, axis=0)[None, :]
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr + layer * H + h)
    row = (b * H * G + h * G + g) * SPLITS + split  # [G_PAD] index into [B, Hq, SPLITS]
    if DIRECT:  # one split, the whole head: part_out_ptr is the output [B, Hq, D] (zeros for a head with no slot)
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out.to(part_out_ptr.dtype.element_ty),
                 mask=(g < G)[:, None])
    else:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + row[:, None] * D + d[None, :], out, mask=(g < G)[:, None] & seen[:, None])
        tl.store(part_lse_ptr + row, lse, mask=g < G)


@triton.jit
def _attention_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr,
                             SPLITS_PAD: tl.constexpr):
    """Stage 2, one (batch row, query head): merge the splits' partials by their log-sum-exp.

    Empty splits (lse = -inf) wrote no partial and are not read. A head with no slot has every
    lse = -inf and gets zeros (the twin's ``nan_to_num``).
    """
    row = tl.program_id(0)  # b * Hq + query head
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    lse = tl.load(part_lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    filled = (s < SPLITS) & (lse > float("-inf"))
    parts = tl.load(part_out_ptr + (row * SPLITS + s[:, None]) * D + d[None, :], mask=filled[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def _pages_per_iteration(head_dim: int, page_size: int) -> int:
    tokens = ATTENTION_BLOCK_TOKENS if head_dim <= 128 else ATTENTION_BLOCK_TOKENS // 2
    return max(1, tokens // page_size)


def default_splits(max_pages: int, rows: int = ROWS_PER_WAVE) -> int:
    """Splits per head: a function of the page-table width M and the number of (row, KV head) pairs
    (never of the lengths), so that the launch shape is fixed for a CUDA-graph bucket."""
    return max(1, min(MAX_SPLITS, max_pages, ROWS_PER_WAVE // max(rows, 1)))


def paged_decode_attention(q, k_pool, v_pool, page_table, lens, seq_ids, layer: int, scale: float,
                           page_size: int, *, num_splits: int | None = None, block_tokens: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None,
                           use_dot: bool | None = None, defer_sums: bool | None = None,
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, read_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.paged_decode_attention_ref` (same arguments and result).

    ``read_dtype``: what fp8 pages are converted to for the dots (default :func:`fp8_read_dtype`).
    ``use_dot`` False (MHA only): CUDA-core sums instead of tensor-core dots; ``defer_sums`` (default: True with
    the sums) then keeps the weighted values per slot row and reduces them once per split (see the split kernel).
    Default (None): the dots, except for fp8 pools with MHA (:data:`FP8_SUMS_BLOCK_TOKENS`).

    ``num_splits`` (default :func:`default_splits`) only trades parallelism for reduction work. The
    partial buffers ``[B, Hq, splits, D]`` come from the caching allocator, which a CUDA graph capture
    serves from its private pool. GQA queries are cast to the pool dtype for the tensor-core dots.
    """
    b, hq, d = q.shape
    h = page_table.shape[2]
    g = hq // h
    q = _rows(q)
    _check_cache(k_pool, v_pool, page_table, lens, seq_ids)
    splits = num_splits or default_splits(page_table.shape[-1], b * h)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # One split (large batches): the split kernel normalises and writes the output itself, no reduce pass.
    part_out = out if splits == 1 else torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    part_lse = out if splits == 1 else torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    if use_dot is None:
        use_dot = not (k_pool.dtype == torch.float8_e4m3fn and g == 1)
        if not use_dot and block_tokens is None:
            block_tokens = FP8_SUMS_BLOCK_TOKENS
    if not use_dot and g != 1:
        raise ValueError(f"CUDA-core sums (use_dot=False) need one query per KV head, got {g} (GQA): use the dots")
    pages = _pages_per_iteration(d, page_size) if block_tokens is None else max(1, block_tokens // page_size)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    if not use_dot and (defer_sums is None or defer_sums):
        extra["ACC_ROWS"] = pages * page_size
    _attention_split_kernel[(b, h, splits)](
        q, k_pool, v_pool, page_table, lens, seq_ids, part_out, part_lse, layer, scale * 1.4426950408889634,
        q.stride(0), q.stride(1),
        ROWS=lens.shape[1], H=h, G=g, G_PAD=max(16, triton.next_power_of_2(g)) if use_dot else 1, D=d,
        M=page_table.shape[-1], PAGE_SIZE=page_size, PAGES=pages,
        SPLITS=splits, USE_DOT=use_dot, **_attention_pool_args(q, k_pool, k_scale, v_scale, layer, h, read_dtype),
        DIRECT=splits == 1, num_warps=num_warps, **extra)
    if splits > 1:
        _attention_reduce_kernel[(b * hq,)](part_out, part_lse, out, D=d, SPLITS=splits,
                                            SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1)
    return out


# --------------------------------------------------------------------------- prefill pooling
@triton.jit
def _chunk_states_kernel(k_ptr, v_ptr, w_ptr, a_ptr, prefix_ptr, cos_ptr, sin_ptr, k_out_ptr, v_out_ptr,
                         n, H, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_cb, stride_cn,
                         P: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    """One (sequence, KV head, block of BT tokens): the W window taps of every token, weighted by ω and
    gated by the running product of α, summed in fp32 registers (the [ωk, ωv, ω] terms are never
    written to memory); then K/Z, V/Z, RoPE of k̄ at the token's position, channel D-1 zeroed.
    Taps before the chunk read the cached window prefix (α = 1 inside it)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = D // 2
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    lo = tl.arange(0, HALF)
    live = t < n
    k_row = k_ptr + b * stride_kb + h * stride_kh
    v_row = v_ptr + b * stride_vb + h * stride_vh
    acc_k_lo = tl.zeros([BT, HALF], tl.float32)
    acc_k_hi = tl.zeros([BT, HALF], tl.float32)
    acc_v_lo = tl.zeros([BT, HALF], tl.float32)
    acc_v_hi = tl.zeros([BT, HALF], tl.float32)
    acc_z = tl.zeros([BT], tl.float32)
    carry = tl.full([BT], 1.0, tl.float32)
    for d in tl.static_range(W):
        src = t - d
        if d > 0:  # c_{src→t} = Π α over (src, t]: one more factor per tap
            carry = carry * tl.load(a_ptr + bh * n + src + 1, mask=live & (src + 1 >= 0), other=1.0)
        inside = live & (src >= 0)
        cw = carry * tl.load(w_ptr + bh * n + src, mask=inside, other=0.0)
        at_k = k_row + src[:, None] * stride_kn + lo[None, :]
        at_v = v_row + src[:, None] * stride_vn + lo[None, :]
        m = inside[:, None]
        acc_k_lo += cw[:, None] * tl.load(at_k, mask=m, other=0.0).to(tl.float32)
        acc_k_hi += cw[:, None] * tl.load(at_k + HALF, mask=m, other=0.0).to(tl.float32)
        acc_v_lo += cw[:, None] * tl.load(at_v, mask=m, other=0.0).to(tl.float32)
        acc_v_hi += cw[:, None] * tl.load(at_v + HALF, mask=m, other=0.0).to(tl.float32)
        acc_z += cw
        if P > 0:  # taps that fall in the cached prefix (already weighted and scaled to the group)
            slot = P + src
            before = live & (src < 0) & (slot >= 0)
            at_p = prefix_ptr + (bh * P + slot)[:, None] * (2 * D + 1) + lo[None, :]
            mp = before[:, None]
            acc_k_lo += carry[:, None] * tl.load(at_p, mask=mp, other=0.0)
            acc_k_hi += carry[:, None] * tl.load(at_p + HALF, mask=mp, other=0.0)
            acc_v_lo += carry[:, None] * tl.load(at_p + D, mask=mp, other=0.0)
            acc_v_hi += carry[:, None] * tl.load(at_p + D + HALF, mask=mp, other=0.0)
            acc_z += carry * tl.load(prefix_ptr + (bh * P + slot) * (2 * D + 1) + 2 * D, mask=before, other=0.0)
    z = tl.maximum(acc_z, 1e-30)[:, None]
    k_lo, k_hi = acc_k_lo / z, acc_k_hi / z
    at_c = cos_ptr + b * stride_cb + t[:, None] * stride_cn + lo[None, :]
    at_s = sin_ptr + b * stride_cb + t[:, None] * stride_cn + lo[None, :]
    m = live[:, None]
    cos_lo = tl.load(at_c, mask=m, other=0.0).to(tl.float32)
    cos_hi = tl.load(at_c + HALF, mask=m, other=0.0).to(tl.float32)
    sin_lo = tl.load(at_s, mask=m, other=0.0).to(tl.float32)
    sin_hi = tl.load(at_s + HALF, mask=m, other=0.0).to(tl.float32)
    rot_lo = k_lo * cos_lo - k_hi * sin_lo
    rot_hi = k_hi * cos_hi + k_lo * sin_hi
    rot_hi = tl.where(lo[None, :] == HALF - 1, 0.0, rot_hi)  # channel D-1, zeroed after RoPE too
    out = (bh * n + t)[:, None] * D + lo[None, :]
    dtype = k_out_ptr.dtype.element_ty
    tl.store(k_out_ptr + out, rot_lo.to(dtype), mask=m)
    tl.store(k_out_ptr + out + HALF, rot_hi.to(dtype), mask=m)
    tl.store(v_out_ptr + out, (acc_v_lo / z).to(dtype), mask=m)
    tl.store(v_out_ptr + out + HALF, (acc_v_hi / z).to(dtype), mask=m)


def chunk_states(k, v, importance, alpha, prefix, cos, sin, window: int, block_tokens: int = 32):
    """Triton twin of :func:`.reference.chunk_states_ref` (same arguments and result)."""
    b, h, n, d = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    importance, alpha = importance.float().contiguous(), alpha.float().contiguous()
    prefix = prefix.float().contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    k_out = torch.empty(b, h, n, d, dtype=k.dtype, device=k.device)
    v_out = torch.empty_like(k_out)
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _chunk_states_kernel[(b * h, triton.cdiv(n, block_tokens))](
        k, v, importance, alpha, prefix, cos, sin, k_out, v_out, n, h,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), stride_cb, cos.stride(1),
        P=prefix.shape[-2], W=window, D=d, BT=block_tokens, num_warps=4)
    return k_out, v_out
