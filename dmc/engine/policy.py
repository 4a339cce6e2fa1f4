"""Cache policies: what a way of keeping slots changes in the engine, as one small object.

The engine asks its policy, never which method it runs. :class:`NoEviction` (DMC, vanilla: every slot stays,
merges happen inside the model's attention) is the default; :class:`dmc.engine.eviction.EngineEviction` (H2O,
TOVA, SnapKV: a fixed budget of slots per head, evicted for real) overrides the hooks below.
"""

from __future__ import annotations

import torch

from .cache import PagedKVCache, SequenceView


class CachePolicy:
    """The hooks and settings of a cache policy, with the values of a policy that keeps every slot.

    Attributes:
        slot_cap: slots a head keeps between steps (None: unbounded); the scheduler's page arithmetic and the
            decode step's worst case read it.
        chunks_per_forward: most prefill chunks in one forward (None: as many as the budget holds).
        packs_first_chunks: whether the first chunks of a batched prefill may run as one packed group.
        observes_compression: whether prefilled rows feed the admission's CR estimate (a cap, not a ratio,
            bounds an evicting row's pages).
        forks: whether a request may start from a copy of another's cache row (the policy's per-row state
            would have to be copied too).
    """

    slot_cap: int | None = None
    chunks_per_forward: int | None = None
    packs_first_chunks: bool = True
    observes_compression: bool = True
    forks: bool = True

    def sequence_view(self, cache: PagedKVCache, row: int, seen: int) -> SequenceView:
        """The prefill view of a cache row that holds ``seen`` tokens."""
        return SequenceView(cache, row, seen)

    def after_decode(self, layer: int, q_rot: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> None:
        """After a decode step's attention in ``layer``: nothing to do when every slot is kept. Tensor ops only
        in an override (the step is captured in CUDA graphs)."""


class NoEviction(CachePolicy):
    """DMC and vanilla models: every slot is kept (DMC merges tokens; it never evicts them)."""
