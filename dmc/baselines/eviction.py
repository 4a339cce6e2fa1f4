"""H2O, TOVA and SnapKV: fixed-budget KV eviction (spec §8), with real eviction.

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
- SnapKV (Li et al. 2024): keep the ``window`` newest slots (the observation window) plus the
  slots the window's queries attend to most, scores pooled over neighbouring key positions
  (``pooling`` of ``kernel`` slots) so that a hit keeps its context.

SnapKV as published compresses the prompt once and keeps every generated token. To hold a fixed
budget through decoding, as H2O and TOVA do here, its rule is applied after every forward: the
attention of the forward's last ``window`` queries (one query while decoding), pooled, is added to
each slot's score, and the ``window`` newest slots are protected. For a prompt prefilled in one
forward this is the paper's selection exactly; while decoding, the newest queries stand for the
observation window as it moves with generation, and a token enters the competition once it leaves
the protected window, carrying the attention it received meanwhile. A budget of prompt scores that
never changed would instead drop every generated token as soon as it left the window (their scores
start at 0), which loses the model's own recent output on long generations.

The scoring and selection (:func:`slot_attention`, :func:`keep_scores`, :func:`kept_slots`) are
shared with the inference engine's eviction (:mod:`dmc.engine.eviction`), so both paths evict alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hf.cache import DMCCache, DMCCacheLayer

METHODS = ("h2o", "tova", "snapkv")
METHOD_NAMES = {"h2o": "H2O", "tova": "TOVA", "snapkv": "SnapKV"}
POOLINGS = ("max", "avg")


@dataclass
class EvictionPolicy:
    method: str
    budget: int  # slots kept per (layer, sequence, KV head)
    recent: int | None = None  # H2O's recent window (default: half the budget)
    window: int | None = None  # SnapKV's observation window (default: 32 as in the paper, at most half the budget)
    pooling: str = "max"  # SnapKV's pooling of scores over key positions: "max" or "avg"
    kernel: int = 7  # SnapKV's pooling width in slots (odd; 1: no pooling)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown eviction method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.budget < 1:
            raise ValueError(f"the eviction budget must be >= 1 slot, got {self.budget}")
        if self.recent is None:
            self.recent = self.budget // 2
        if not 0 <= self.recent <= self.budget:
            raise ValueError(f"H2O's recent window must be within the budget, got {self.recent} > {self.budget}")
        if self.window is None:
            self.window = min(32, max(1, self.budget // 2))
        if not 1 <= self.window <= self.budget:
            raise ValueError(f"SnapKV's observation window must be 1 to the budget ({self.budget}) slots, "
                             f"got {self.window}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown SnapKV pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV's pooling kernel must be an odd number of slots >= 1, got {self.kernel}")

    @property
    def accumulates(self) -> bool:
        """Whether slots carry a score from step to step (H2O, SnapKV); TOVA rescores each step."""
        return self.method != "tova"

    @property
    def protected(self) -> int:
        """The newest slots never evicted: H2O's recent window, SnapKV's observation window."""
        return {"h2o": self.recent, "snapkv": self.window}.get(self.method, 0)

    @property
    def scoring_queries(self) -> int | None:
        """How many of a forward's last queries score the slots (None: all of them)."""
        return {"tova": 1, "snapkv": self.window}.get(self.method)


def budget_for(context_length: int, cr: float) -> int:
    """Slots per head matching DMC's cache at compression ratio ``cr`` over ``context_length`` tokens."""
    return max(1, math.ceil(context_length / cr))


def slot_attention(q: torch.Tensor, keys: torch.Tensor, slot_positions: torch.Tensor, query_positions: torch.Tensor,
                   scale: float, valid: torch.Tensor, *, last: int | None, block: int = 256) -> torch.Tensor:
    """Attention probabilities of a chunk's queries to each slot, per KV head (mean over the query
    heads of its group), summed over the valid queries, or over the last ``last`` columns' only.

    Args:
        q: rotated queries ``[B, H*G, n, D]``; keys: the slots ``[B, H, S, D]``.
        slot_positions: each slot's token position ``[B, H, S]`` (-1: no slot). A query sees the
            slots at positions up to its own, ``query_positions`` ``[B, n]``.
        valid: ``[B, n]`` bool, False for padding queries (they add nothing).
        last: TOVA's score is the last query's attention (1), SnapKV's the observation window's
            (``window``; with left padding a row's real queries are its last columns); None (H2O):
            the sum over all queries. See :attr:`EvictionPolicy.scoring_queries`.
        block: queries per block, so a long prompt never materialises ``[H*G, n, S]`` logits at once.

    Returns: ``[B, H, S]`` fp32 (0 for slots no query sees).
    """
    b, hq, n, d = q.shape
    h = keys.shape[1]
    if last is not None and last < n:
        q, query_positions, valid = q[..., -last:, :], query_positions[:, -last:], valid[:, -last:]
        n = last
    keys, seen_slot = keys.float(), slot_positions[:, :, None, :] >= 0
    total = torch.zeros(b, h, keys.shape[-2], dtype=torch.float32, device=keys.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        qb = q[..., start:stop, :].float().reshape(b, h, hq // h, stop - start, d)
        logits = torch.einsum("bhgqd,bhsd->bhgqs", qb, keys) * scale
        visible = seen_slot & (slot_positions[:, :, None, :] <= query_positions[:, None, start:stop, None])
        probs = torch.softmax(logits.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)
        probs = probs.nan_to_num(0.0).mean(2) * valid[:, None, start:stop, None]  # [B, H, m, S]
        total += probs.sum(2)
    return total


def pool_over_positions(scores: torch.Tensor, slot_positions: torch.Tensor, pooling: str, kernel: int) -> torch.Tensor:
    """SnapKV's 1-D pooling of ``scores`` ``[..., S]`` over each slot's neighbours in token order
    (``kernel`` slots centred on it; slots with position -1 take no part and score 0). Slots are
    sorted by position first, so the result does not depend on where a slot is stored (the engine
    moves slots around, the HF cache keeps them in order)."""
    if kernel == 1:
        return scores
    real = slot_positions >= 0
    order = torch.argsort(slot_positions.masked_fill(~real, torch.iinfo(slot_positions.dtype).max), dim=-1)
    flat = lambda t: t.gather(-1, order).reshape(-1, 1, t.shape[-1])  # noqa: E731 - [rows, 1, S] for the pools
    ordered, mask = flat(scores.float()), flat(real).float()
    pad = kernel // 2
    if pooling == "max":
        pooled = torch.nn.functional.max_pool1d(ordered.masked_fill(mask == 0, float("-inf")), kernel, 1, pad)
    else:  # the mean over the real neighbours (padding slots count for none)
        sums = torch.nn.functional.avg_pool1d(ordered * mask, kernel, 1, pad, count_include_pad=True)
        counts = torch.nn.functional.avg_pool1d(mask, kernel, 1, pad, count_include_pad=True)
        pooled = sums / counts.clamp_min(1e-9)
    pooled = (pooled * mask).reshape(scores.shape).nan_to_num(0.0)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


def break_ties_by_position(keep_score: torch.Tensor, slot_positions: torch.Tensor) -> torch.Tensor:
    """``keep_score`` ``[..., S]`` as ranks of (score, position): equal scores rank the older slot
    lower, so it goes first. Max pooling gives whole clusters one score; without this the HF cache
    (top-k over ordered slots) and the engine (argmin over moved slots) would part on ties."""
    by_position = torch.argsort(slot_positions, dim=-1, stable=True)
    by_score = torch.argsort(keep_score.gather(-1, by_position), dim=-1, stable=True)
    order = by_position.gather(-1, by_score)  # slots from the first to go to the last
    ranks = torch.arange(order.shape[-1], device=order.device, dtype=torch.float32).expand(order.shape)
    return torch.empty_like(ranks).scatter_(-1, order, ranks)


def keep_scores(policy: EvictionPolicy, attention: torch.Tensor, scores: torch.Tensor,
                slot_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What to keep by, from :func:`slot_attention`'s ``attention`` ``[..., S]``: TOVA the current
    query's attention; H2O the accumulated attention ``scores + attention``; SnapKV the same with
    the attention pooled over key positions first, ties going to the newer slot; H2O and SnapKV
    protect the :attr:`~EvictionPolicy.protected` newest slots (by position). Returns
    ``(keep_score, new accumulated scores)``."""
    if not policy.accumulates:
        return attention, scores
    if policy.method == "snapkv":
        attention = pool_over_positions(attention, slot_positions, policy.pooling, policy.kernel)
    scores = scores + attention
    newest_first = torch.argsort(torch.argsort(slot_positions, dim=-1, descending=True), dim=-1)
    keep = scores.masked_fill(newest_first < policy.protected, float("inf"))
    return (break_ties_by_position(keep, slot_positions) if policy.method == "snapkv" else keep), scores


def kept_slots(keep_score: torch.Tensor, slot_positions: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``budget`` slots to keep ``[..., S]`` -> ``(order, kept)`` ``[..., budget]``: the kept slots'
    indices in their old order (then padding indices) and whether each entry is a kept real slot."""
    real = slot_positions >= 0
    top = torch.topk(keep_score.masked_fill(~real, float("-inf")), k=budget, dim=-1).indices
    keep = torch.zeros_like(real).scatter_(-1, top, True) & real
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :budget]
    return order, keep.gather(-1, order)


class EvictionCacheLayer(DMCCacheLayer):
    """A DMC cache layer in vanilla mode (one slot per token) that evicts down to a budget.

    Adds ``positions`` ``[B, H, S]`` (each slot's token position, -1 for padding slots), ``scores``
    (H2O's and SnapKV's accumulated attention) and ``seen`` ``[B]`` (real tokens consumed)."""

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
        attention = slot_attention(q, self.keys, self.positions, self.query_positions, scale, valid,
                                   last=self.policy.scoring_queries)
        keep_score, self.scores = keep_scores(self.policy, attention, self.scores, self.positions)
        self._evict(keep_score)

    def _evict(self, keep_score: torch.Tensor) -> None:
        if int(self.lengths.max()) <= self.policy.budget:
            return
        # compact: kept slots first, in their old (oldest-first) order; the evicted are gone
        order, kept = kept_slots(keep_score, self.positions, self.policy.budget)
        gather = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, gather), self.values.gather(2, gather)
        self.positions = self.positions.gather(2, order).masked_fill(~kept, -1)
        self.scores = self.scores.gather(2, order)
        self.lengths = kept.sum(-1)


class EvictionCache(DMCCache):
    """A cache of at most ``policy.budget`` slots per (layer, sequence, KV head)."""

    def __init__(self, config, policy: EvictionPolicy) -> None:
        super().__init__(config, layer_factory=lambda layer_idx: EvictionCacheLayer(policy))
        self.policy = policy
