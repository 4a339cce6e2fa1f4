"""The prefill's cache writes of packed first chunks in one Triton kernel per layer.

A batched prefill's first chunks (several new sequences in one forward) end each layer by writing their kept
states into pages and their window state into the ring: in tensor ops (:func:`dmc.engine.cache.commit_packed`'s
twin, built from :mod:`dmc.core`) about sixty launches of the host's a layer, which is what a small model's
prefill waits for (``benchmarks/prefill_ops.py``). Here one program per (KV head, chunk) walks the chunk's tokens:

- token t ends a slot unless token t+1 merges (α > 0.5; the chunk's last token always ends one); its slot is
  the number of slot ends before it in the chunk; its k̄, v̄ go to that slot's page (the pages are reserved for
  every layer before the forward: :meth:`dmc.engine.cache.PagedKVCache.reserve`);
- the head's slot count becomes the chunk's number of slot ends;
- the ring gets the chunk's last W-1 raw tokens that belong to the open group (no append after them), as weights
  ω and raw k, v (what :func:`dmc.core.next_window_state` keeps, stored as ``_store_ring`` stores it), entry i of
  that state at ring index (i + n) mod (W-1) for a chunk of n tokens.

Pools of the model dtype only (fp8 pools and the calibration's recording take the tensor ops).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _commit_first_chunks_kernel(a_ptr, w_ptr, kb_ptr, vb_ptr, k_ptr, v_ptr, first_ptr, last_ptr, rows_ptr,
                                table_ptr, k_pool_ptr, v_pool_ptr, lens_ptr, ring_kv_ptr, ring_w_ptr,
                                n, H, M,
                                stride_kbh, stride_kbn, stride_vbh, stride_vbn, stride_kh, stride_kn,
                                stride_vh, stride_vn,
                                D: tl.constexpr, P: tl.constexpr, R: tl.constexpr, RB: tl.constexpr,
                                BT: tl.constexpr):
    h = tl.program_id(0)
    s = tl.program_id(1)
    first = tl.load(first_ptr + s)
    last = tl.load(last_ptr + s)
    row = tl.load(rows_ptr + s)
    d = tl.arange(0, D)
    table = table_ptr + (row * H + h) * M
    count = first * 0  # slots so far (an integer of the loop's type)
    for start in range(first, last + 1, BT):
        t = start + tl.arange(0, BT)
        live = t <= last
        following = tl.load(a_ptr + h * n + t + 1, mask=live & (t < last), other=0.0)
        kept = live & (following <= 0.5)  # the next token appends (or there is none): t ends its slot
        slot = count + tl.cumsum(kept.to(tl.int32), 0) - 1
        page = tl.load(table + slot // P, mask=kept, other=0).to(tl.int64)
        at = (page * P + slot % P)[:, None] * D + d[None, :]
        m = kept[:, None]
        tl.store(k_pool_ptr + at, tl.load(kb_ptr + h * stride_kbh + t[:, None] * stride_kbn + d[None, :], mask=m),
                 mask=m)
        tl.store(v_pool_ptr + at, tl.load(vb_ptr + h * stride_vbh + t[:, None] * stride_vbn + d[None, :], mask=m),
                 mask=m)
        count += tl.sum(kept.to(tl.int32), 0)
    tl.store(lens_ptr + row * H + h, count.to(tl.int32))
    # The window state: the last R tokens, those of the open group (from the chunk's last append on) kept.
    j = tl.arange(0, RB)
    t = last - R + 1 + j
    real = (j < R) & (t >= first)
    alpha = tl.load(a_ptr + h * n + t, mask=real, other=1.0)
    group_start = tl.max(tl.where(real & (alpha <= 0.5), j, -1), 0)
    member = real & (j >= group_start)
    omega = tl.load(w_ptr + h * n + t, mask=member, other=0.0)
    weight = tl.where(member, omega, 0.0)
    slot = (j + (last - first + 1)) % R
    ring = (row * H + h) * R + slot
    tl.store(ring_w_ptr + ring, weight, mask=j < R)
    m = member[:, None]
    keep = (j < R)[:, None]
    divisor = tl.where(weight > 0, weight, 1.0)[:, None]
    raw_k = tl.load(k_ptr + h * stride_kh + t[:, None] * stride_kn + d[None, :], mask=m, other=0.0).to(tl.float32)
    raw_v = tl.load(v_ptr + h * stride_vh + t[:, None] * stride_vn + d[None, :], mask=m, other=0.0).to(tl.float32)
    out = ring_kv_ptr + ring[:, None] * (2 * D) + d[None, :]
    dtype = ring_kv_ptr.dtype.element_ty
    tl.store(out, (weight[:, None] * raw_k / divisor).to(dtype), mask=keep)
    tl.store(out + D, (weight[:, None] * raw_v / divisor).to(dtype), mask=keep)


def commit_first_chunks(cache, layer: int, packed, alpha, k_bar, v_bar, importance, k, v,
                        block_tokens: int = 64) -> None:
    """Write one layer's packed first chunks into ``cache`` (a :class:`dmc.engine.cache.PagedKVCache` whose pages
    for them are reserved): ``alpha``, ``importance`` ``[H, n]``, ``k_bar``, ``v_bar`` (pooled, rotated) and the
    pre-RoPE ``k`` (channel D-1 zeroed), ``v`` ``[H, n, D]``; ``packed`` the forward's
    :class:`dmc.hf.attention.PackedChunks` (``first``, ``last``, ``rows``). What the tensor ops of
    :func:`dmc.engine.cache.commit_packed` write."""
    h, n, d = k_bar.shape
    width = cache.layout.ring_width
    alpha, importance = alpha.float().contiguous(), importance.float().contiguous()
    k_bar, v_bar, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_bar, v_bar, k, v))
    table = cache.page_table[layer]
    _commit_first_chunks_kernel[(h, packed.first.shape[0])](
        alpha, importance, k_bar, v_bar, k, v, packed.first, packed.last, packed.rows,
        table, cache.k_pool, cache.v_pool, cache.lens[layer], cache.ring_kv[layer], cache.ring_w[layer],
        n, h, table.shape[-1],
        k_bar.stride(0), k_bar.stride(1), v_bar.stride(0), v_bar.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        D=d, P=cache.layout.page_size, R=width, RB=triton.next_power_of_2(width), BT=block_tokens, num_warps=4)
