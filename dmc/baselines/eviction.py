"""H2O and TOVA: fixed-budget KV eviction at decode time (spec §8), with real eviction.

The cache holds at most ``budget`` slots per (layer, sequence, KV head): evicted keys and values
are removed from storage, not masked. Used on a converted model in vanilla mode (every token
appends, the original model's attention):

    model = dmc.convert(stock_model); model.set_dmc_mode(vanilla=True)
    cache = EvictionCache(model.config, EvictionPolicy("tova", budget=256))
    model.generate(ids, past_key_values=cache, ...)

A prompt is prefilled with full attention and then cut to the budget; every decoding step then
evicts what exceeds it. Scores come from the attention probabilities of the step's queries, per KV
head (averaged over the query heads of its group):
- TOVA (Oren et al. 2024): keep the slots the *current* (last) query attends to most.
- H2O (Zhang et al. 2023): keep the ``recent`` newest slots plus the heavy hitters by attention
  accumulated over all queries so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hf.cache import DMCCache, DMCCacheLayer

METHODS = ("h2o", "tova")


@dataclass
class EvictionPolicy:
    method: str
    budget: int  # slots kept per (layer, sequence, KV head)
    recent: int | None = None  # H2O's recent window (default: half the budget)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown eviction method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.budget < 1:
            raise ValueError(f"the eviction budget must be >= 1 slot, got {self.budget}")
        if self.recent is None:
            self.recent = self.budget // 2
        if not 0 <= self.recent <= self.budget:
            raise ValueError(f"H2O's recent window must be within the budget, got {self.recent} > {self.budget}")


def budget_for(context_length: int, cr: float) -> int:
    """Slots per head matching DMC's cache at compression ratio ``cr`` over ``context_length`` tokens."""
    return max(1, math.ceil(context_length / cr))


class EvictionCacheLayer(DMCCacheLayer):
    """A DMC cache layer in vanilla mode (one slot per token) that evicts down to a budget.

    Adds ``positions`` ``[B, H, S]`` (each slot's token position, -1 for padding slots), ``scores``
    (H2O's accumulated attention) and ``seen`` ``[B]`` (real tokens consumed)."""

    def __init__(self, policy: EvictionPolicy) -> None:
        super().__init__(window=1)
        self.policy = policy
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def _select(self, index: torch.Tensor) -> None:
        super()._select(index)
        for name in ("positions", "scores", "seen"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))

    def commit(self, alpha, valid, k_bar, v_bar, prefix, terms, sums) -> None:
        if bool((alpha > 0.5)[valid[:, None, :].expand_as(alpha)].any()):
            raise ValueError("eviction baselines run on the model in vanilla mode: "
                             "call model.set_dmc_mode(vanilla=True)")
        b, h, n = alpha.shape
        old_lengths = self.lengths if self.lengths is not None else alpha.new_zeros(b, h, dtype=torch.long)
        old_size = 0 if self.positions is None else self.positions.shape[-1]
        seen = self.seen if self.seen is not None else torch.zeros(b, dtype=torch.long, device=alpha.device)
        super().commit(alpha, valid, k_bar, v_bar, prefix, terms, sums)
        size = self.keys.shape[-2]
        positions = torch.full((b, h, size + 1), -1, dtype=torch.long, device=alpha.device)
        scores = torch.zeros(b, h, size + 1, dtype=torch.float32, device=alpha.device)
        positions[..., :old_size] = self.positions if old_size else positions[..., :0]
        scores[..., :old_size] = self.scores if old_size else scores[..., :0]
        rank = valid.long().cumsum(-1)  # 1-based rank of each real token in the chunk
        slot = torch.where(valid[:, None, :], old_lengths[..., None] + rank[:, None, :] - 1, size)  # size = scratch
        token_pos = (seen[:, None] + rank - 1)[:, None, :].expand(b, h, n)
        positions.scatter_(2, slot, token_pos)
        self.positions, self.scores = positions[..., :size], scores[..., :size]
        self.query_positions = seen[:, None] + rank - 1  # [B, n], for after_attention
        self.seen = seen + valid.sum(-1)

    def after_attention(self, q: torch.Tensor, scale: float, valid: torch.Tensor) -> None:
        """Score the slots with this step's attention probabilities, then evict down to the budget."""
        b, hq, n, d = q.shape
        h = self.keys.shape[1]
        logits = torch.einsum("bhgqd,bhsd->bhgqs", q.float().view(b, h, hq // h, n, d), self.keys.float()) * scale
        slot_pos = self.positions[:, :, None, :]  # [B, H, 1, S]
        visible = (slot_pos >= 0) & (slot_pos <= self.query_positions[:, None, :, None])  # [B, H, n, S]
        probs = torch.softmax(logits.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)
        probs = probs.nan_to_num(0.0).mean(2) * valid[:, None, :, None]  # mean over the group's query heads
        if self.policy.method == "h2o":
            self.scores = self.scores + probs.sum(2)
            newest_first = torch.argsort(torch.argsort(self.positions, dim=-1, descending=True), dim=-1)
            keep_score = self.scores.masked_fill(newest_first < self.policy.recent, float("inf"))
        else:
            keep_score = probs[:, :, -1]  # TOVA: the current query's attention
        self._evict(keep_score)

    def _evict(self, keep_score: torch.Tensor) -> None:
        budget = self.policy.budget
        if int(self.lengths.max()) <= budget:
            return
        real = self.positions >= 0
        top = torch.topk(keep_score.masked_fill(~real, float("-inf")), k=budget, dim=-1).indices
        keep = torch.zeros_like(real).scatter_(-1, top, True) & real
        # compact: kept slots first, in their old (oldest-first) order; the evicted are gone
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :budget]
        gather = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, gather), self.values.gather(2, gather)
        self.positions = self.positions.gather(2, order).masked_fill(~keep.gather(2, order), -1)
        self.scores = self.scores.gather(2, order)
        self.lengths = keep.sum(-1)


class EvictionCache(DMCCache):
    """A cache of at most ``policy.budget`` slots per (layer, sequence, KV head)."""

    def __init__(self, config, policy: EvictionPolicy) -> None:
        super().__init__(config)
        self.layers = [EvictionCacheLayer(policy) for _ in range(config.num_hidden_layers)]
        self.policy = policy
