"""Triton kernels of the decode step with delayed merging (``merge_delay`` w > 0, spec §9).

Twins of :func:`.reference.delayed_decode_update_ref` and :func:`.reference.delayed_decode_attention_ref`
(same arguments, same results; their docstrings and :mod:`.reference` define the delay ring's layout).
They reuse the building blocks of :mod:`.triton_kernels`: the decision (``_decision``), the window sums
(``_window_sums``), RoPE (``_rope``) and the paged split-K attention stage (``_attention_split_kernel``).

- Update, one program per (row, KV head): the new token decides (α, ω); the token it replaces in the
  ring (w older) goes through the DMC slot update with its stored α, ω and its own RoPE tables; then the
  new token's k, v, α, ω take its place.
- Attention: the split kernel over the pages, then one kernel per (row, query head) that attends over the
  raw window (keys rotated at their own positions, channel D-1 zeroed, the first ``min(pos + 1, w)``
  visible) and merges that partial with the splits' by their log-sum-exp: one softmax over both.

FP8 pools (``torch.float8_e4m3fn``) as in :mod:`.triton_kernels`: the leaving token's slot is quantised with
its (layer, KV head)'s scales (``_to_pool``), the split stage reads e4m3 with them; the delay ring is never quantised.

Like :mod:`.triton_kernels`, the wrappers never read device memory on the host and allocate only
data-independent shapes, so a delayed decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import core
from .triton_kernels import (_attention_pool_args, _attention_split_kernel, _check_cache, _decision,
                             _pages_per_iteration, _pool_args, _rope, _rows, _to_pool, _window_sums, default_splits)


# --------------------------------------------------------------------------- decode update
@triton.jit
def _commit(k, v, alpha, weight, cos, sin, t, head, dims, side, last, k_pool_ptr, v_pool_ptr, table_ptr, lens_ptr,
            ring_ptr, ring_kv_ptr, ring_w_ptr, k_scale_ptr, v_scale_ptr, scale_index, D: tl.constexpr, M: tl.constexpr,
            R: tl.constexpr, R_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, UNBOUNDED: tl.constexpr,
            FP8: tl.constexpr):
    """One token of one head through the DMC update (:func:`.reference.commit_token_ref`): window sums,
    k̄ rotated at the token's position with channel D-1 zeroed, slot write (a merge overwrites the last
    slot), lens bump. ``k``, ``v`` fp32 ``[1, 2, D/2]`` (k channel D-1 zeroed); ``head`` indexes lens,
    page table and window state. fp8 pools: the slot is quantised with the scales at ``scale_index`` (its
    (layer, KV head)'s; only the slot: the window state stays exact)."""
    head64 = head.to(tl.int64)
    k_sum, v_sum, z_sum = _window_sums(ring_ptr + head64 * (2 * D + 1), ring_kv_ptr + head64 * (R * 2 * D),
                                       ring_w_ptr + head64 * R, k, v, weight, alpha, t, dims, D, R, R_PAD, UNBOUNDED)
    z = tl.maximum(z_sum, 1e-30)
    k_rot = tl.where(last, 0.0, _rope(k_sum / z, cos, sin, side))
    old = tl.load(lens_ptr + head)
    slot = tl.where((alpha > 0.5) & (old > 0), old - 1, old)
    page = tl.load(table_ptr + head64 * M + slot // PAGE_SIZE)
    at = page.to(tl.int64) * (PAGE_SIZE * D) + (slot % PAGE_SIZE) * D + dims
    tl.store(k_pool_ptr + at, _to_pool(k_rot, k_scale_ptr, scale_index, k_pool_ptr.dtype.element_ty, FP8))
    tl.store(v_pool_ptr + at, _to_pool(v_sum / z, v_scale_ptr, scale_index, v_pool_ptr.dtype.element_ty, FP8))
    tl.store(lens_ptr + head, slot + 1)


@triton.jit(do_not_specialize=["layer", "forced_period"])
def _delayed_update_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, leave_cos_ptr, leave_sin_ptr, seq_ptr, pos_ptr,
                           q_out_ptr, alpha_ptr, k_pool_ptr, v_pool_ptr, table_ptr, lens_ptr, ring_ptr, ring_kv_ptr,
                           ring_w_ptr, delay_kv_ptr, delay_aw_ptr, layer, init_offset, forced_period,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                           ROWS: tl.constexpr, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                           D: tl.constexpr, M: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, W: tl.constexpr,
                           PAGE_SIZE: tl.constexpr, UNBOUNDED: tl.constexpr, FLOOR: tl.constexpr,
                           k_scale_ptr=None, v_scale_ptr=None, FP8: tl.constexpr = False):
    """One (batch row, KV head): decision and rotated queries of token t; token t - w (if t >= w) leaves
    the ring at index t % w through :func:`_commit`; token t takes that entry. A padding row (seq id -1)
    writes its token into the scratch row's ring (as the twin does) and touches nothing else."""
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
    q = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + dims, mask=group_rows, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + dims).to(tl.float32)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + dims).to(tl.float32)
    cos = tl.load(cos_ptr + b * D + dims).to(tl.float32)
    sin = tl.load(sin_ptr + b * D + dims).to(tl.float32)
    alpha, weight = _decision(q, k, t, group_rows, last, init_offset, forced_period, G, FLOOR)
    alpha = tl.where(seq >= 0, alpha, 0.0)
    q = tl.where(last, 0.0, q)
    k = tl.where(last, 0.0, k)
    q_rot = tl.where(last, 0.0, _rope(q, cos, sin, side))
    tl.store(q_out_ptr + (b * G * H + h * G + g) * D + dims, q_rot.to(q_out_ptr.dtype.element_ty), mask=group_rows)
    tl.store(alpha_ptr + b * H + h, alpha)

    row = tl.where(seq >= 0, seq, ROWS - 1)
    head = (layer * ROWS + row) * H + h
    entry = head.to(tl.int64) * W + t % W  # index t % w of this head's ring
    raw = delay_kv_ptr + entry * (2 * D)
    if (seq >= 0) & (t >= W):  # token t - w leaves the ring
        k_old = tl.load(raw + dims).to(tl.float32)
        v_old = tl.load(raw + D + dims).to(tl.float32)
        alpha_old = tl.load(delay_aw_ptr + entry * 2)
        weight_old = tl.load(delay_aw_ptr + entry * 2 + 1)
        leave_cos = tl.load(leave_cos_ptr + b * D + dims).to(tl.float32)
        leave_sin = tl.load(leave_sin_ptr + b * D + dims).to(tl.float32)
        _commit(k_old, v_old, alpha_old, weight_old, leave_cos, leave_sin, t - W, head, dims, side, last,
                k_pool_ptr, v_pool_ptr, table_ptr, lens_ptr, ring_ptr, ring_kv_ptr, ring_w_ptr, k_scale_ptr,
                v_scale_ptr, layer * H + h, D, M, R, R_PAD, PAGE_SIZE, UNBOUNDED, FP8)
    tl.debug_barrier()  # every thread has read the leaving entry before it is overwritten
    dtype = delay_kv_ptr.dtype.element_ty
    tl.store(raw + dims, k.to(dtype))
    tl.store(raw + D + dims, v.to(dtype))
    tl.store(delay_aw_ptr + entry * 2, alpha)
    tl.store(delay_aw_ptr + entry * 2 + 1, weight)


def delayed_decode_update(q, k, v, cos, sin, leave_cos, leave_sin, seq_ids, pos, layer: int, k_pool, v_pool,
                          page_table, lens, ring, ring_kv, ring_w, delay_kv, delay_aw, *, init_offset: float,
                          window: int | None, page_size: int, forced_period: int = 0,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`.reference.delayed_decode_update_ref` (same arguments and results)."""
    b, hq, d = q.shape
    h = k.shape[1]
    q, k, v = _rows(q), _rows(k), _rows(v)
    cos, sin, leave_cos, leave_sin = (x.contiguous() for x in (cos, sin, leave_cos, leave_sin))
    _check_cache(k_pool, v_pool, page_table, lens, ring, ring_kv, ring_w, delay_kv, delay_aw, seq_ids, pos)
    if delay_kv.shape[1] != lens.shape[1]:
        raise ValueError("delay_kv must hold one ring per sequence row (the cache of a delayed model)")
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    alpha = torch.empty(b, h, dtype=torch.float32, device=q.device)
    width = ring_w.shape[3]
    _delayed_update_kernel[(b, h)](
        q, k, v, cos, sin, leave_cos, leave_sin, seq_ids, pos, q_rot, alpha, k_pool, v_pool, page_table, lens, ring,
        ring_kv, ring_w, delay_kv, delay_aw, layer, float(init_offset), int(forced_period),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROWS=lens.shape[1], H=h, G=hq // h, G_PAD=triton.next_power_of_2(hq // h), D=d, M=page_table.shape[-1],
        R=width, R_PAD=triton.next_power_of_2(width), W=delay_kv.shape[3], PAGE_SIZE=page_size,
        UNBOUNDED=window is None, FLOOR=core.IMPORTANCE_FLOOR,
        **_pool_args(q, k_pool, k_scale, v_scale, layer, h), num_warps=1)
    return q_rot, alpha


# --------------------------------------------------------------------------- attention
@triton.jit(do_not_specialize=["layer"])
def _window_reduce_kernel(q_ptr, delay_kv_ptr, delay_rope_ptr, seq_ptr, pos_ptr, part_out_ptr, part_lse_ptr,
                          out_ptr, layer, scale_log2, stride_qb, stride_qh,
                          ROWS: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                          W_PAD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One (batch row, query head): its query over the raw window (log2 domain, fp32), merged with the
    pages' split partials by their log-sum-exp (``_attention_reduce_kernel`` plus one partial). Ring entry
    j is visible iff j <= pos (the first min(pos + 1, w) entries hold tokens). Nothing visible: zeros."""
    row = tl.program_id(0)  # b * Hq + query head
    b = row // (H * G)
    h = (row % (H * G)) // G
    HALF: tl.constexpr = D // 2
    seq = tl.load(seq_ptr + b)
    t = tl.load(pos_ptr + b)
    j = tl.arange(0, W_PAD)
    d = tl.arange(0, D)
    visible = (j < W) & (j <= t) & (seq >= 0)
    m2 = visible[:, None]
    r = tl.maximum(seq, 0)
    raw = delay_kv_ptr + (((layer * ROWS + r) * H + h).to(tl.int64) * W + j[:, None]) * (2 * D)  # [W_PAD, 1]
    keys = tl.load(raw + d[None, :], mask=m2, other=0.0).to(tl.float32)
    partner = tl.load(raw + ((d + HALF) % D)[None, :], mask=m2, other=0.0).to(tl.float32)  # rotate_half source
    tables = delay_rope_ptr + (r.to(tl.int64) * W + j[:, None]) * (2 * D) + d[None, :]
    cos = tl.load(tables, mask=m2, other=0.0).to(tl.float32)
    sin = tl.load(tables + D, mask=m2, other=0.0).to(tl.float32)
    keys = keys * cos + tl.where(d[None, :] < HALF, -partner, partner) * sin
    keys = tl.where(d[None, :] == D - 1, 0.0, keys)
    q = tl.load(q_ptr + b * stride_qb + (row % (H * G)) * stride_qh + d).to(tl.float32)
    scores = tl.where(visible, tl.sum(keys * q[None, :], axis=1) * scale_log2, float("-inf"))
    m_w = tl.max(scores, axis=0)
    probs = tl.where(visible, tl.exp2(scores - tl.where(m_w == float("-inf"), 0.0, m_w)), 0.0)
    l_w = tl.sum(probs, axis=0)
    values = tl.load(raw + D + d[None, :], mask=m2, other=0.0).to(tl.float32)
    out_w = tl.sum(probs[:, None] * values, axis=0) / tl.where(l_w > 0, l_w, 1.0)
    lse_w = tl.where(l_w > 0, m_w + tl.log2(tl.where(l_w > 0, l_w, 1.0)), float("-inf"))

    s = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.maximum(tl.max(lse, axis=0), lse_w)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    weight_w = tl.exp2(lse_w - top)
    filled = (s < SPLITS) & (lse > float("-inf"))
    parts = tl.load(part_out_ptr + (row * SPLITS + s[:, None]) * D + d[None, :], mask=filled[:, None], other=0.0)
    total = tl.sum(weight, axis=0) + weight_w
    out = (tl.sum(weight[:, None] * parts, axis=0) + weight_w * out_w) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


def delayed_decode_attention(q, k_pool, v_pool, page_table, lens, seq_ids, pos, layer: int, scale: float,
                             page_size: int, delay_kv, delay_rope, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None, *, num_splits: int | None = None,
                             num_warps: int = 4, use_dot: bool | None = None) -> torch.Tensor:
    """Triton twin of :func:`.reference.delayed_decode_attention_ref` (same arguments and result).

    The pages go through ``_attention_split_kernel`` as in :func:`.triton_kernels.paged_decode_attention`
    (``num_splits``, ``use_dot`` as there); the window partial and the reduction are one more kernel."""
    b, hq, d = q.shape
    h = page_table.shape[2]
    g = hq // h
    q = _rows(q)
    _check_cache(k_pool, v_pool, page_table, lens, seq_ids, pos, delay_kv, delay_rope)
    splits = num_splits or default_splits(page_table.shape[-1], b * h)
    part_out = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    use_dot = True if use_dot is None else use_dot
    scale_log2 = scale * 1.4426950408889634
    _attention_split_kernel[(b, h, splits)](
        q, k_pool, v_pool, page_table, lens, seq_ids, part_out, part_lse, layer, scale_log2, q.stride(0), q.stride(1),
        ROWS=lens.shape[1], H=h, G=g, G_PAD=max(16, triton.next_power_of_2(g)) if use_dot else 1, D=d,
        M=page_table.shape[-1], PAGE_SIZE=page_size, PAGES=_pages_per_iteration(d, page_size), SPLITS=splits,
        USE_DOT=use_dot, **_attention_pool_args(q, k_pool, k_scale, v_scale, layer, h),
        num_warps=num_warps)
    delay = delay_kv.shape[3]
    _window_reduce_kernel[(b * hq,)](
        q, delay_kv, delay_rope, seq_ids, pos, part_out, part_lse, out, layer, scale_log2, q.stride(0), q.stride(1),
        ROWS=lens.shape[1], H=h, G=g, D=d, W=delay, W_PAD=triton.next_power_of_2(delay), SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1)
    return out
