"""PyTorch twins of the engine's Triton kernels: the CPU path and the tests' reference.

Cache layout (see :mod:`dmc.engine.cache`): one page pool shared by every layer and KV head,
``k_pool``/``v_pool`` ``[num_pages, P, D]`` with one head per page; per layer, a page table
``[L, S, H, M]`` (int32, page ids; S = sequence rows, M = pages a head may hold), slot counts
``lens`` ``[L, S, H]`` (int32) and the DMC window state.

Window state, bounded window W: a ring of R = W - 1 entries; token t lives at index ``t % R`` as its
raw key (channel D-1 zeroed) and value in ``ring_kv`` ``[L, S, H, R, 2D]`` (cache dtype: exactly the
projection outputs, half the bytes of fp32 terms) and its importance ω in ``ring_w`` ``[L, S, H, R]``
(fp32; 0 for tokens outside the open group). The weighted terms ``[ω k, ω v, ω]`` are formed in
fp32 when summed. Unbounded window: ``ring`` ``[L, S, H, 1, 2D + 1]`` fp32 holds the open group's
running sums.

A batch row b of a decode step belongs to sequence row ``seq_ids[b]`` (-1: a padding row of a
CUDA-graph bucket, skipped) and holds token ``pos[b]`` (0-based position in its sequence).
"""

from __future__ import annotations

import torch

from ... import core


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention): ``x * cos + rotate_half(x) * sin``; cos/sin broadcast."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def ring_terms(ring_kv: torch.Tensor, ring_w: torch.Tensor) -> torch.Tensor:
    """The ring as weighted terms ``[..., R, 2D + 1]`` fp32: ``[ω k, ω v, ω]``."""
    w = ring_w.unsqueeze(-1)
    return torch.cat([w * ring_kv.float(), w], dim=-1)


def decode_update_ref(q, k, v, cos, sin, seq_ids, pos, layer: int, k_pool, v_pool, page_table, lens, ring,
                      ring_kv, ring_w, *,
                      init_offset: float, window: int | None, vanilla: bool, page_size: int,
                      forced_period: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of one layer for a batch: decisions, window sums, RoPE, slot write.

    Args:
        q: queries before RoPE ``[B, H*G, D]``; k, v: ``[B, H, D]`` (model dtype).
        cos, sin: RoPE tables at each row's position ``[B, D]``.
        seq_ids: ``[B]`` int32 sequence rows (-1 = skip); pos: ``[B]`` int32 token positions.
        layer: the layer index into page_table/lens/ring.
        k_pool, v_pool, page_table, lens, ring, ring_kv, ring_w: the cache (updated in place).
        init_offset: c. window: W or None. vanilla: plain attention (α = 0, ω = 1, channel
            D-1 kept). page_size: P. forced_period: benchmarks only; > 0 replaces the decision
            channel by α_t = 1[t % period != 0] (every head compresses at CR = period).

    Returns:
        ``(q_rot, alpha)``: rotated queries ``[B, H*G, D]`` (channel D-1 zeroed unless vanilla)
        and the decisions ``[B, H]`` fp32 (0 on skipped rows).
    """
    b, hq, d = q.shape
    h = k.shape[1]
    active = seq_ids >= 0
    rows = seq_ids.long().clamp_min(0)
    t = pos.long()
    qf, kf, vf = q.float(), k.float(), v.float()
    if vanilla:
        alpha = torch.zeros(b, h, device=q.device)
        weight = torch.ones(b, h, device=q.device)
    else:
        logits = kf[..., -1] - init_offset
        weight = torch.sigmoid(qf[..., -1].view(b, h, hq // h).mean(-1) + init_offset) + core.IMPORTANCE_FLOOR
        alpha = (logits > 0).float()
        if forced_period > 0:
            alpha = (t % forced_period != 0).float()[:, None].expand(b, h)
        alpha = alpha.masked_fill((t == 0)[:, None], 0.0)
        qf, kf = core.zero_last_channel(qf), core.zero_last_channel(kf)
    alpha = alpha * active[:, None]
    terms = core.weighted_terms(weight, kf, vf)  # [B, H, 2D+1]

    a = alpha[..., None]
    if vanilla:
        sums = terms
    elif window is None:
        sums = terms + a * ring[layer, rows][:, :, 0]
        state = sums[:, :, None].clone()
    else:
        kv_state, w_state = ring_kv[layer, rows].clone(), ring_w[layer, rows] * alpha[..., None]
        sums = terms + a * ring_terms(ring_kv[layer, rows], ring_w[layer, rows]).sum(2)
        here = t % w_state.shape[2]
        kv_state[torch.arange(b), :, here] = torch.cat([kf, vf], -1).to(ring_kv.dtype)
        w_state[torch.arange(b), :, here] = weight
    k_bar, v_bar = core.normalise(sums, d)
    cos_, sin_ = cos.float()[:, None], sin.float()[:, None]
    k_bar = rope(k_bar, cos_, sin_)
    q_rot = rope(qf, cos_, sin_)
    if not vanilla:
        k_bar, q_rot = core.zero_last_channel(k_bar), core.zero_last_channel(q_rot)

    old = lens[layer, rows].long()  # [B, H]
    merge = (alpha > 0.5) & (old > 0)
    slot = torch.where(merge, old - 1, old)
    page = page_table[layer, rows[:, None], torch.arange(h, device=q.device)[None], slot // page_size].long()
    sel = active[:, None].expand(b, h)
    k_pool[page[sel], (slot % page_size)[sel]] = k_bar[sel].to(k_pool.dtype)
    v_pool[page[sel], (slot % page_size)[sel]] = v_bar[sel].to(v_pool.dtype)
    lens[layer, rows[active]] = (slot + 1)[active].to(lens.dtype)
    if vanilla:
        pass
    elif window is None:
        ring[layer, rows[active]] = state[active]
    else:
        ring_kv[layer, rows[active]] = kv_state[active]
        ring_w[layer, rows[active]] = w_state[active]
    return q_rot.to(q.dtype), alpha


def gather_slots(k_pool, v_pool, page_table, lens, seq_ids, layer: int, page_size: int,
                 num_slots: int | None = None):
    """Each row's slots as padded tensors: keys, values ``[B, H, S_max, D]`` and a visibility mask
    ``[B, H, S_max]`` (S_max = the longest head of the batch, one host sync; or ``num_slots`` when
    the caller knows a bound: no sync, as a CUDA graph needs). ``v_pool=None``: keys only (values
    None), for callers that only score the slots."""
    rows = seq_ids.long().clamp_min(0)
    length = lens[layer, rows].long() * (seq_ids >= 0)[:, None]  # [B, H]
    s_max = num_slots or max(int(length.max()) if length.numel() else 0, 1)
    slots = torch.arange(s_max, device=k_pool.device)
    pages = page_table[layer, rows][..., slots // page_size].long()  # [B, H, S_max]
    keys = k_pool[pages, slots % page_size]
    values = None if v_pool is None else v_pool[pages, slots % page_size]
    return keys, values, slots < length[..., None]


def paged_decode_attention_ref(q, k_pool, v_pool, page_table, lens, seq_ids, layer: int, scale: float,
                               page_size: int) -> torch.Tensor:
    """Attention of one query per row over its heads' slots (GQA: G query heads per KV head).

    ``q``: rotated queries ``[B, H*G, D]``. Returns ``[B, H*G, D]`` (zeros on skipped rows).
    """
    b, hq, d = q.shape
    keys, values, visible = gather_slots(k_pool, v_pool, page_table, lens, seq_ids, layer, page_size)
    groups = hq // keys.shape[1]
    qg = q.float().view(b, keys.shape[1], groups, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys.float()) * scale
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no slot → 0
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values.float())
    return out.reshape(b, hq, d).to(q.dtype)


def allocate_pages_ref(lens, page_table, seq_ids, free_pages, free_top, page_size: int) -> None:
    """Give a fresh page to every (layer, row, head) of the batch whose next slot's page is not
    allocated yet (its table entry is the null page 0).

    Keeps the invariant "page ``lens // P`` is allocated" after a step. ``free_pages``: the free
    stack (int32), ``free_top``: a one-element int64 tensor, its size. All on the device, no host
    sync: the count is taken with an exclusive cumsum. The caller keeps ``free_top`` above the
    worst case (one page per row and head and layer).
    """
    active = seq_ids >= 0
    # Skipped rows read and write back the cache's scratch row (the last one), never a real one.
    rows = torch.where(active, seq_ids.long(), lens.shape[1] - 1)
    length = lens[:, rows].long()  # [L, B, H]
    layers = torch.arange(lens.shape[0], device=lens.device)[:, None, None]
    heads = torch.arange(lens.shape[2], device=lens.device)[None, None, :]
    index = (layers, rows[None, :, None], heads, (length // page_size).clamp_max(page_table.shape[-1] - 1))
    current = page_table[index]
    need = (current == 0) & active[None, :, None]  # page 0 = not allocated (a merge keeps lens)
    flat = need.flatten()
    order = flat.long().cumsum(0) - 1  # index of this row among the needy
    take = (free_top - 1 - order).clamp(0, free_pages.shape[0] - 1)  # rows that need none read a dummy
    fresh = free_pages[take].view_as(need)
    page_table[index] = torch.where(need, fresh, current)
    free_top -= flat.sum()


def chunk_states_ref(k, v, importance, alpha, prefix, cos, sin, window: int):
    """Pooled, rotated DMC states of a prefill chunk (spec §3 with a cached window prefix).

    Args:
        k, v: keys (channel D-1 zeroed) and values before RoPE ``[B, H, n, D]``.
        importance, alpha: ω and hard α ``[B, H, n]`` fp32 (padding: ω = 0, α = 1).
        prefix: the window state before the chunk ``[B, H, P, 2D + 1]`` fp32 (P = 0 or W - 1).
        cos, sin: RoPE tables ``[B or 1, n, D]``. window: W (bounded).

    Returns:
        ``(k̄, v̄)`` ``[B, H, n, D]`` in k's dtype: windowed weighted means, k̄ rotated (in fp32) at
        each token's position with channel D-1 zeroed.
    """
    from ...hf.attention import pool_with_prefix

    sums = pool_with_prefix(alpha, core.weighted_terms(importance, k, v), window, prefix)
    k_bar, v_bar = core.normalise(sums, k.shape[-1])
    k_bar = core.zero_last_channel(rope(k_bar, cos.float()[:, None], sin.float()[:, None]))
    return k_bar.to(k.dtype), v_bar.to(k.dtype)
