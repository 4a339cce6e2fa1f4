"""H2O, TOVA and SnapKV in the engine: fixed-budget KV eviction with real eviction (spec §8).

``dmc.LLM(model, eviction=EvictionPolicy("tova", budget=256))``. The policy, its validation and
the scoring are those of the HF path (:mod:`dmc.baselines.eviction`: :func:`slot_attention`,
:func:`keep_scores`, :func:`kept_slots`), so both paths keep the same tokens. The model runs in
vanilla mode (every token appends a slot); each (layer, sequence, KV head) holds at most
``budget`` slots between steps, and an evicted slot's storage is reused.

- **Prefill** is the usual one (the model's own attention over a :class:`SequenceView`, full
  attention over the prompt); after each layer's chunk the slots are scored with the chunk's
  queries and cut to the budget: the kept ones move to the front of the head's pages (oldest first,
  like the HF cache) and the pages past the budget go back on the free stack. A prompt needs its
  full length in pages only while it is prefilled (a chunk at a time: a prompt fed in chunks is cut
  after each, as the HF cache fed the same chunks would be).
- **Decode**: the step appends the token (slot ``budget`` at most, in the page the head already
  holds) and the paged kernel attends over the ``budget + 1`` slots; then the slots are scored with
  a plain PyTorch softmax over the gathered keys (the Triton attention kernel does not output
  probabilities: this gathers every key once more and is the slow part of an eviction step; its
  measured cost: docs/benchmarks.md, "History"), and
  each head over the budget moves its last slot into the victim's place and drops its count by one.
  The order of slots does not matter to attention (keys are stored rotated). Fixed shapes and no
  host sync, so the step is still captured in CUDA graphs.

FP8 pools (``kv_cache_dtype="fp8"``): the slots are scored on their dequantised values and moved as
stored bytes (a kept slot is never quantised twice).

Per-slot state on the device, ``[L, S + 1, H, budget + 1]``: each slot's token position (int32,
-1 = none; the protected windows of H2O and SnapKV, SnapKV's pooling and the tests read it) and, for
H2O and SnapKV, its accumulated attention (fp32). SnapKV pools over slots sorted by position, so the
slot moves of the decode step change nothing (:func:`~dmc.baselines.eviction.pool_over_positions`).
"""

from __future__ import annotations

import torch

from ..baselines.eviction import EvictionPolicy, keep_scores, kept_slots, slot_attention
from ..kernels.reference import dequantise, head_scales
from .cache import CacheLayout, PagedKVCache, SequenceView, _LayerView, gather_slots
from .policy import CachePolicy


class EngineEviction(CachePolicy):
    """An eviction policy applied to one :class:`PagedKVCache`: the engine's :class:`CachePolicy` for H2O, TOVA
    and SnapKV. A head keeps ``budget`` slots; a prefill chunk runs alone in its forward (a batch would hold every
    chunk's pages at once, uncut) and never packed (each chunk's layer is cut after its attention); the cap, not
    a ratio, bounds a row's pages, so prefills are not observed for the CR estimate; rows are not forked (their
    slot positions and scores are per row)."""

    chunks_per_forward = 1
    packs_first_chunks = False
    observes_compression = False
    forks = False

    def __init__(self, policy: EvictionPolicy, cache: PagedKVCache) -> None:
        self.policy, self.cache = policy, cache
        self.slot_cap = policy.budget
        layout = cache.layout
        shape = (layout.num_layers, layout.max_seqs + 1, layout.num_kv_heads, policy.budget + 1)
        self.positions = torch.full(shape, -1, dtype=torch.int32, device=cache.device)
        self.scores = torch.zeros(shape if self.accumulates else (1, 1, 1, 1), dtype=torch.float32,
                                  device=cache.device)

    @property
    def accumulates(self) -> bool:
        return self.policy.accumulates

    @staticmethod
    def sequence_bytes(layout: CacheLayout, policy: EvictionPolicy) -> int:
        """Per-slot state bytes of one sequence row (for the engine's memory sizing)."""
        return layout.rows * (policy.budget + 1) * (8 if policy.accumulates else 4)

    # ------------------------------------------------------------------ prefill
    def sequence_view(self, cache: PagedKVCache, row: int, seen: int) -> SequenceView:
        """The prefill view of a row whose layers cut the slots to the budget after each chunk."""
        return SequenceView(cache, row, seen, lambda layer: _EvictingLayerView(self, row, layer, seen))

    def after_prefill(self, layer: int, row: int, seen: int, old_lens: torch.Tensor, q: torch.Tensor, scale: float,
                      valid: torch.Tensor) -> None:
        """Score a row's slots with a prefill chunk's queries ``q`` ``[1, H*G, n, D]`` and cut them
        to the budget. ``old_lens`` ``[H]``: the slots the heads held before the chunk."""
        cache, budget, p = self.cache, self.policy.budget, self.cache.layout.page_size
        keys, values, visible = gather_slots(cache.k_pool, cache.v_pool, cache.page_table, cache.lens,
                                             torch.tensor([row], dtype=torch.int32, device=cache.device), layer, p)
        slot = torch.arange(keys.shape[-2], device=cache.device)
        old = old_lens.long()[:, None]
        earlier = slot < old  # slots kept from before the chunk; then one per chunk token
        kept_before = slot.clamp_max(budget)
        positions = torch.where(earlier, self.positions[layer, row][:, kept_before].long(), seen + slot - old)
        positions = positions.masked_fill(~visible[0], -1)[None]  # [1, H, S]
        scores = (self.scores[layer, row][:, kept_before] * earlier)[None] if self.accumulates else None
        query_positions = seen + torch.arange(q.shape[-2], device=cache.device)[None]
        scored = dequantise(keys, head_scales(cache.k_scale, layer))  # fp8: the stored values (fp32); else keys itself
        attention = slot_attention(q, scored, positions, query_positions, scale, valid,
                                   last=self.policy.scoring_queries)
        keep, scores = keep_scores(self.policy, attention, scores, positions)
        if keys.shape[-2] > budget:
            order, kept = kept_slots(keep, positions, budget)  # [1, H, budget]
            self._compact(layer, row, keys[0], values[0], order[0], kept[0])
            positions = positions.gather(-1, order).masked_fill(~kept, -1)
            scores = scores.gather(-1, order) if self.accumulates else None
        width = positions.shape[-1]
        self.positions[layer, row, :, :width] = positions[0].to(torch.int32)
        if self.accumulates:
            self.scores[layer, row, :, :width] = scores[0]

    def _compact(self, layer: int, row: int, keys, values, order: torch.Tensor, kept: torch.Tensor) -> None:
        """Write the kept slots (``order`` ``[H, budget]`` into the gathered ``keys``/``values``
        ``[H, S, D]``) to the front of each head's pages, then free the pages past them."""
        cache, p = self.cache, self.cache.layout.page_size
        slot = torch.arange(order.shape[-1], device=cache.device)
        page = cache.page_table[layer, row][:, slot // p].long()  # [H, budget]
        heads = torch.arange(order.shape[0], device=cache.device)[:, None]
        # Indexing, not gather: it moves fp8 pool elements too (CPU gather has no fp8 kernel).
        cache.k_pool[page[kept], (slot % p).expand_as(page)[kept]] = keys[heads, order][kept]
        cache.v_pool[page[kept], (slot % p).expand_as(page)[kept]] = values[heads, order][kept]
        cache.shrink(layer, row, kept.sum(-1))

    # ------------------------------------------------------------------ decode
    def after_decode(self, layer: int, q_rot: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> None:
        """After a decode step's attention in ``layer`` (which appended one slot per head): score the
        ``budget + 1`` slots with the step's queries ``q_rot`` ``[B, H*G, D]`` and evict one slot from
        every head over the budget. No host sync (seq id -1: a padding row, left alone)."""
        cache, budget, p = self.cache, self.policy.budget, self.cache.layout.page_size
        active = seq_ids >= 0
        rows = torch.where(active, seq_ids.long(), cache.scratch_row)  # padding rows touch the scratch row
        lens = cache.lens[layer, rows].long()  # [B, H], after the append
        keys, _, visible = gather_slots(cache.k_pool, None, cache.page_table, cache.lens, seq_ids, layer, p,
                                        num_slots=budget + 1)
        last = (lens - 1).clamp_min(0)[..., None]  # the slot just appended
        slot_pos = self.positions[layer, rows].long()  # [B, H, budget + 1]
        slot_pos.scatter_(2, last, positions.long()[:, None, None].expand_as(last))
        slot_pos = slot_pos.masked_fill(~visible, -1)
        scores = self.scores[layer, rows].scatter_(2, last, 0.0) if self.accumulates else None
        keys = dequantise(keys, head_scales(cache.k_scale, layer))  # fp8: the stored values (fp32)
        attention = slot_attention(q_rot[:, :, None, :], keys, slot_pos, positions.long()[:, None], scale,
                                   active[:, None], last=self.policy.scoring_queries)
        keep, scores = keep_scores(self.policy, attention, scores, slot_pos)
        over = (lens > budget) & active[:, None]
        victim = torch.where(over[..., None], keep.masked_fill(~visible, float("inf")).argmin(-1, keepdim=True), last)
        # the last slot moves into the victim's place (a no-op copy for heads not over the budget)
        table = cache.page_table[layer, rows]
        src = (table.gather(2, last // p).long(), last % p)
        dst = (table.gather(2, victim // p).long(), victim % p)
        cache.k_pool[dst] = cache.k_pool[src]
        cache.v_pool[dst] = cache.v_pool[src]
        cache.lens[layer, rows] = (lens - over.long()).to(torch.int32)
        self.positions[layer, rows] = slot_pos.scatter(2, victim, slot_pos.gather(2, last)).to(torch.int32)
        if self.accumulates:
            self.scores[layer, rows] = scores.scatter(2, victim, scores.gather(2, last))


class _EvictingLayerView(_LayerView):
    """A prefill layer view that cuts the row to the budget once the chunk's attention is done
    (:class:`~dmc.hf.attention.DMCAttention` calls ``after_attention`` after ``commit``)."""

    def __init__(self, eviction: EngineEviction, row: int, layer: int, seen: int) -> None:
        super().__init__(eviction.cache, row, layer, seen)
        self.eviction = eviction
        self.old_lens: torch.Tensor | None = None

    def commit(self, alpha, valid, k_bar, v_bar, prefix, terms, sums) -> None:
        self.old_lens = self.slot_lengths()[0].clone()
        super().commit(alpha, valid, k_bar, v_bar, prefix, terms, sums)

    def after_attention(self, q: torch.Tensor, scale: float, valid: torch.Tensor) -> None:
        self.eviction.after_prefill(self.layer, self.row, self.seen, self.old_lens, q, scale, valid)
