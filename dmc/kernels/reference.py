"""PyTorch twins of the Triton kernels: the CPU path and the tests' reference.

Each twin is built from :mod:`dmc.core` (decisions, pooling, slot rules), so a kernel that agrees
with its twin computes the rules of core. They depend on nothing else of dmc.

Cache layout (owned by :mod:`dmc.engine.cache`): one page pool shared by every layer and KV head,
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

from .. import core


# --------------------------------------------------------------------------- FP8 pages
# kv_cache_dtype="fp8": the pools hold e4m3 (torch.float8_e4m3fn) and every (layer, KV head) has a k and a v
# scale (``k_scale``, ``v_scale`` fp32 ``[L, H]``; None = 1.0): stored = clamp(x / scale, ±448) cast to e4m3,
# read = fp32(stored) * scale. Only the pages are quantised; the DMC window state (ring, sums) and the delayed-merging
# ring stay in fp32 / the model dtype, and a merge rewrites the last slot from that exact state.
FP8_MAX = 448.0  # largest finite e4m3fn value


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def quantise(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as pool elements of ``dtype``: a plain cast, or for fp8 ``clamp(x / scale, ±448)`` rounded to
    nearest even (``scale`` a tensor that broadcasts over ``x``, or None = 1)."""
    if not is_fp8(dtype):
        return x.to(dtype)
    x = x.float() if scale is None else x.float() / scale
    return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantise(x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pool elements as values: fp8 → ``fp32(x) * scale``; any other dtype unchanged."""
    if not is_fp8(x.dtype):
        return x
    return x.float() if scale is None else x.float() * scale


def head_scales(scales: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    """The ``[H, 1, 1]`` scales of ``layer``'s KV heads (from ``[L, H]``), to broadcast over ``[..., H, S, D]``
    slots; None stays None (1.0)."""
    return None if scales is None else scales[layer][:, None, None]


def _row_scales(scales: torch.Tensor | None, layer: int) -> torch.Tensor | None:
    """``layer``'s scales ``[H, 1]``, to broadcast over one token's ``[B, H, D]``."""
    return None if scales is None else scales[layer][:, None]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention): ``x * cos + rotate_half(x) * sin``; cos/sin broadcast."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def decode_update_ref(q, k, v, cos, sin, seq_ids, pos, layer: int, k_pool, v_pool, page_table, lens, ring,
                      ring_kv, ring_w, *,
                      init_offset: float, window: int | None, vanilla: bool, page_size: int,
                      forced_period: int = 0, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        k_scale, v_scale: per-(layer, KV head) fp32 scales ``[L, H]`` of fp8 pools (None = 1.0; ignored otherwise).

    Returns:
        ``(q_rot, alpha)``: rotated queries ``[B, H*G, D]`` (channel D-1 zeroed unless vanilla)
        and the decisions ``[B, H]`` fp32 (0 on skipped rows).
    """
    b, hq, d = q.shape
    h = k.shape[1]
    active = seq_ids >= 0
    qf, kf, vf = q.float(), k.float(), v.float()
    if vanilla:
        alpha = torch.zeros(b, h, device=q.device)
        weight = torch.ones(b, h, device=q.device)
    else:
        qf, kf, alpha, weight = _decisions(qf, kf, pos, init_offset, forced_period)
    alpha = alpha * active[:, None]
    commit_token_ref(kf, vf, alpha, weight, cos, sin, seq_ids, pos, layer, k_pool, v_pool, page_table, lens, ring,
                     ring_kv, ring_w, window=window, vanilla=vanilla, page_size=page_size, k_scale=k_scale,
                     v_scale=v_scale)
    q_rot = rope(qf, cos.float()[:, None], sin.float()[:, None])
    if not vanilla:
        q_rot = core.zero_last_channel(q_rot)
    return q_rot.to(q.dtype), alpha


def _decisions(qf, kf, pos, init_offset: float, forced_period: int):
    """The decision channel of one token per row: a chunk of length 1 (spec §1-§2). fp32 ``q`` ``[B, H*G, D]``,
    ``k`` ``[B, H, D]`` → ``(q, k)`` with channel D-1 zeroed, α and ω ``[B, H]``."""
    t = pos.long()
    qs, ks, logits, importance = core.split_decision_channel(qf[:, :, None], kf[:, :, None], init_offset)
    alpha = core.inference_decisions(logits, starts=(t == 0)[:, None], positions=t[:, None],
                                     forced_period=forced_period)[..., 0]
    return qs[:, :, 0], ks[:, :, 0], alpha, importance[..., 0]


def commit_token_ref(kf, vf, alpha, weight, cos, sin, seq_ids, pos, layer: int, k_pool, v_pool, page_table, lens,
                     ring, ring_kv, ring_w, *, window: int | None, vanilla: bool, page_size: int,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """One token per row through the DMC update (spec §2): window sums, RoPE at its position, slot write
    (a merge overwrites the last slot, an append opens one), window state. ``kf``, ``vf`` ``[B, H, D]`` fp32
    (k before RoPE, channel D-1 zeroed unless vanilla), its decisions ``alpha`` and importances ``weight``
    ``[B, H]``, RoPE tables ``[B, D]`` and positions ``pos`` ``[B]`` of the token; rows with seq id -1 are
    skipped. The second half of :func:`decode_update_ref`; delayed merging runs it on the token that leaves
    the delay ring (:func:`delayed_decode_update_ref`). fp8 pools: only the written slot is quantised; the sums
    come from the fp32 window state, so a merge rewrites the slot from exact values (no error builds up)."""
    b, h, d = kf.shape
    active = seq_ids >= 0
    rows = seq_ids.long().clamp_min(0)
    t = pos.long()
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
        w = ring_w[layer, rows].unsqueeze(-1)  # the ring's weighted terms [ω k, ω v, ω]
        sums = terms + a * torch.cat([w * ring_kv[layer, rows].float(), w], dim=-1).sum(2)
        here = t % w_state.shape[2]
        kv_state[torch.arange(b), :, here] = torch.cat([kf, vf], -1).to(ring_kv.dtype)
        w_state[torch.arange(b), :, here] = weight
    k_bar, v_bar = core.normalise(sums, d)
    k_bar = rope(k_bar, cos.float()[:, None], sin.float()[:, None])
    if not vanilla:
        k_bar = core.zero_last_channel(k_bar)

    old = lens[layer, rows].long()  # [B, H]
    slot = old - core.merges_into_last(alpha, old).long()  # a merge overwrites the last slot
    page = page_table[layer, rows[:, None], torch.arange(h, device=kf.device)[None], slot // page_size].long()
    sel = active[:, None].expand(b, h)
    k_pool[page[sel], (slot % page_size)[sel]] = quantise(k_bar, k_pool.dtype, _row_scales(k_scale, layer))[sel]
    v_pool[page[sel], (slot % page_size)[sel]] = quantise(v_bar, v_pool.dtype, _row_scales(v_scale, layer))[sel]
    lens[layer, rows[active]] = (slot + 1)[active].to(lens.dtype)
    if vanilla:
        pass
    elif window is None:
        ring[layer, rows[active]] = state[active]
    else:
        ring_kv[layer, rows[active]] = kv_state[active]
        ring_w[layer, rows[active]] = w_state[active]


# --------------------------------------------------------------------------- delayed merging
# merge_delay w > 0 (DMCConfig): every head also keeps its last w tokens raw, token t at index t % w of
# ``delay_kv`` ``[L, S, H, w, 2D]`` (k before RoPE with channel D-1 zeroed, v; cache dtype) and ``delay_aw``
# ``[L, S, H, w, 2]`` (fp32 α and ω, decided when the token came in), with the RoPE tables of those tokens in
# ``delay_rope`` ``[S, w, 2, D]`` (cos, sin; one per row, written by the caller); the model dtype, also with
# fp8 pools. Their Triton kernels: :mod:`.triton_delayed` (CUDA); these twins run elsewhere and are its oracle.
def delayed_decode_update_ref(q, k, v, cos, sin, leave_cos, leave_sin, seq_ids, pos, layer: int, k_pool, v_pool,
                              page_table, lens, ring, ring_kv, ring_w, delay_kv, delay_aw, *, init_offset: float,
                              window: int | None, page_size: int, forced_period: int = 0,
                              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoding step of one layer with delayed merging: token ``pos`` decides (α, ω) and enters the delay
    ring; the token it replaces there, ``pos - w`` (if ``pos >= w``), leaves and goes through the DMC update
    with its own α, ω and RoPE tables ``leave_cos``/``leave_sin`` ``[B, D]`` (:func:`commit_token_ref`).
    Arguments otherwise as :func:`decode_update_ref`. Returns ``(q_rot, alpha)`` of the new token."""
    b, hq, d = q.shape
    h, delay = k.shape[1], delay_kv.shape[3]
    active = seq_ids >= 0
    qf, kf, alpha, weight = _decisions(q.float(), k.float(), pos, init_offset, forced_period)
    alpha = alpha * active[:, None]
    # Skipped rows read and write the scratch row (the last one), never a real one.
    rows = torch.where(active, seq_ids.long(), delay_kv.shape[1] - 1)[:, None]
    here = (pos.long() % delay)[:, None]
    heads = torch.arange(h, device=q.device)[None]
    raw, raw_aw = delay_kv[layer][rows, heads, here], delay_aw[layer][rows, heads, here]  # [B, H, 2D], [B, H, 2]
    leaving = torch.where(pos >= delay, seq_ids, -1)
    commit_token_ref(raw[..., :d].float(), raw[..., d:].float(), raw_aw[..., 0], raw_aw[..., 1], leave_cos,
                     leave_sin, leaving, pos - delay, layer, k_pool, v_pool, page_table, lens, ring, ring_kv, ring_w,
                     window=window, vanilla=False, page_size=page_size, k_scale=k_scale, v_scale=v_scale)
    delay_kv[layer][rows, heads, here] = torch.cat([kf, v.float()], -1).to(delay_kv.dtype)
    delay_aw[layer][rows, heads, here] = torch.stack([alpha, weight], -1)
    q_rot = core.zero_last_channel(rope(qf, cos.float()[:, None], sin.float()[:, None]))
    return q_rot.to(q.dtype), alpha


def delayed_decode_attention_ref(q, k_pool, v_pool, page_table, lens, seq_ids, pos, layer: int, scale: float,
                                 page_size: int, delay_kv, delay_rope, k_scale: torch.Tensor | None = None,
                                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row with delayed merging: over its heads' slots (the tokens older than
    the window, as :func:`paged_decode_attention_ref`) and the raw keys of its last ``min(pos + 1, w)``
    tokens, rotated at their own positions with channel D-1 zeroed (as ``dmc.hf.attention.raw_states``),
    in one softmax. ``q`` rotated ``[B, H*G, D]``; ``pos`` ``[B]`` the query's position (its token is in
    the ring already). Returns ``[B, H*G, D]`` (zeros on skipped rows)."""
    d = q.shape[-1]
    active = seq_ids >= 0
    rows = seq_ids.long().clamp_min(0)
    keys, values, visible = _row_slots(k_pool, v_pool, page_table, lens, seq_ids, layer, page_size, k_scale, v_scale)
    raw, tables = delay_kv[layer, rows], delay_rope[rows]  # [B, H, w, 2D], [B, w, 2, D]
    raw_k = core.zero_last_channel(rope(raw[..., :d], tables[:, None, :, 0], tables[:, None, :, 1]))
    delay = raw.shape[2]
    raw_visible = (torch.arange(delay, device=q.device)[None] <= pos.long()[:, None]) & active[:, None]  # [B, w]
    keys = torch.cat([keys.float(), raw_k.float()], dim=2)
    values = torch.cat([values.float(), raw[..., d:].float()], dim=2)
    visible = torch.cat([visible, raw_visible[:, None].expand(-1, keys.shape[1], -1)], dim=-1)
    return _grouped_attention(q, keys, values, visible, scale)


def _row_slots(k_pool, v_pool, page_table, lens, seq_ids, layer: int, page_size: int, k_scale=None, v_scale=None):
    """Each row's slots, padded to the longest head of the batch: keys, values ``[B, H, S_max, D]`` and
    the bool ``[B, H, S_max]`` of the real ones. Slot s of a head lives in page table[s // P] at offset
    s % P (the layout's one addressing rule, as the kernel reads it); skipped rows have none. fp8 pools come
    back dequantised (fp32)."""
    rows = seq_ids.long().clamp_min(0)
    length = lens[layer, rows].long() * (seq_ids >= 0)[:, None]  # [B, H]
    slots = torch.arange(max(int(length.max()) if length.numel() else 0, 1), device=k_pool.device)
    pages = page_table[layer, rows][..., slots // page_size].long()  # [B, H, S_max]
    keys = dequantise(k_pool[pages, slots % page_size], head_scales(k_scale, layer))
    values = dequantise(v_pool[pages, slots % page_size], head_scales(v_scale, layer))
    return keys, values, slots < length[..., None]


def _grouped_attention(q, keys, values, visible, scale: float) -> torch.Tensor:
    """One query per row over per-KV-head keys (GQA: G query heads per KV head), fp32 softmax; rows that
    see nothing give 0. ``q`` ``[B, H*G, D]``, keys/values ``[B, H, S, D]``, ``visible`` ``[B, H, S]``."""
    b, hq, d = q.shape
    groups = hq // keys.shape[1]
    qg = q.float().view(b, keys.shape[1], groups, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, keys.float()) * scale
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key → 0
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values.float())
    return out.reshape(b, hq, d).to(q.dtype)


def paged_decode_attention_ref(q, k_pool, v_pool, page_table, lens, seq_ids, layer: int, scale: float,
                               page_size: int, k_scale: torch.Tensor | None = None,
                               v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row over its heads' slots (GQA: G query heads per KV head).

    ``q``: rotated queries ``[B, H*G, D]``. Returns ``[B, H*G, D]`` (zeros on skipped rows). fp8 pools are
    read as ``fp32 * k_scale[layer, head]`` / ``v_scale[layer, head]`` (None = 1.0).
    """
    keys, values, visible = _row_slots(k_pool, v_pool, page_table, lens, seq_ids, layer, page_size, k_scale, v_scale)
    return _grouped_attention(q, keys, values, visible, scale)


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
    sums = core.pool_with_prefix(alpha, core.weighted_terms(importance, k, v), window, prefix)
    k_bar, v_bar = core.normalise(sums, k.shape[-1])
    k_bar = core.zero_last_channel(rope(k_bar, cos.float()[:, None], sin.float()[:, None]))
    return k_bar.to(k.dtype), v_bar.to(k.dtype)
