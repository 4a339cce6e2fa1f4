"""The DMC key-value cache of the Hugging Face path.

Each (layer, sequence, KV head) keeps only its slots: an append opens a slot, a merge
overwrites the last one (spec §2). Storage is a ``[B, H, S, D]`` tensor per layer where S is
the longest head *of that layer*: shorter heads are padded up to it and masked out. This is
the honest reference layout for the HF path; the engine (``dmc.engine``) stores every head
in its own pages so that padding costs neither memory nor bandwidth.

Besides the slots each head keeps its window state: the last W-1 weighted terms
``[ω k, ω v, ω]`` (fp32) of its open group, scaled to the group (entries of earlier groups are
0), or, with an unbounded window, the group's running sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import core
from ..config import DMCConfig


# Delayed merging (merge_delay w > 0): what DMCCacheLayer.pending holds for its last w token columns, and
# the token dimension of each: pre-RoPE k (channel D-1 zeroed) and v, hard α, importance ω, validity, and
# the columns' RoPE tables.
PENDING_DIMS = {"k": 2, "v": 2, "alpha": 2, "importance": 2, "valid": 1, "cos": 1, "sin": 1}


class SlotCacheLayer(Protocol):
    """What :class:`~dmc.hf.attention.DMCAttention` asks of one layer of a cache: the contract of
    :class:`DMCCacheLayer`, the engine's paged view and the eviction baselines' layers.

    Shapes: ``alpha`` hard decisions ``[B, H, n]`` (padding: 1), ``valid`` ``[B, n]`` bool, states
    ``[B, H, n, D]``, window terms ``[B, H, ·, 2D + 1]`` fp32.
    """

    def window_prefix(self, terms: torch.Tensor) -> torch.Tensor:
        """The window state to pool a new chunk with ``[B, H, P, 2D + 1]`` (P = 0 for an empty cache)."""
        ...

    def visible_slots(self, alpha: torch.Tensor, valid: torch.Tensor,
                      like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached keys, values ``[B, H, S, D]`` (dtype of ``like``) and the bool ``[B, H, S]`` of those
        the chunk's queries may see (all but a last slot its first token merges into)."""
        ...

    def commit(self, alpha: torch.Tensor, valid: torch.Tensor, k_bar: torch.Tensor, v_bar: torch.Tensor,
               prefix: torch.Tensor, terms: torch.Tensor, sums: torch.Tensor | None) -> None:
        """Write the chunk: its kept states become slots (:func:`dmc.core.slot_writes`) and the window
        state moves on (:func:`dmc.core.next_window_state`)."""
        ...

    def after_attention(self, q: torch.Tensor, scale: float, valid: torch.Tensor) -> None:
        """Called once the chunk's attention is done (``q`` its rotated queries): cache policies that
        score slots (the eviction baselines) evict here. No-op by default."""
        return None


class DMCCacheLayer(CacheLayerMixin, SlotCacheLayer):
    """Slots and window state of one layer. ``keys``/``values``: ``[B, H, S, D]`` (rotated,
    channel D-1 zeroed); ``lengths``: ``[B, H]`` slots kept per head; ``window_state``:
    ``[B, H, P, 2D + 1]`` fp32 with P = W - 1 (or 1 running sum when W is None)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.lengths: torch.Tensor | None = None
        self.window_state: torch.Tensor | None = None
        # Delayed merging (merge_delay w > 0): the last w token columns, not yet merged or appended.
        # Written by DMCAttention; names and token dims in PENDING_DIMS.
        self.pending: dict[str, torch.Tensor] | None = None

    # -- transformers' layer interface ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError("DMCCacheLayer is filled by DMCAttention, not by Cache.update()")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "DMCCache cannot take raw keys/values: only a DMC model (dmc.convert / from_pretrained of a "
            "DMC checkpoint) can write to it.")

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.lengths = self.window_state = self.pending = None
        self.is_initialized = False

    def pending_slots(self) -> torch.Tensor | int:
        """Raw tokens held by each head ``[B, H]`` (delayed merging; 0 otherwise): they count as slots."""
        if self.pending is None:
            return 0
        return self.pending["valid"].sum(-1, keepdim=True).expand_as(self.pending["alpha"][..., 0])

    def _select(self, index: torch.Tensor) -> None:
        if self.pending is not None:
            self.pending = {k: t.index_select(0, index.to(t.device)) for k, t in self.pending.items()}
        if self.keys is None:
            return
        for name in ("keys", "values", "lengths", "window_state"):
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(0, index.to(tensor.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        like = self.keys if self.keys is not None else (None if self.pending is None else self.pending["valid"])
        if like is not None:
            self._select(torch.arange(like.shape[0], device=like.device).repeat_interleave(repeats))

    # -- DMC state transitions ----------------------------------------------------------------
    def state_width(self) -> int:
        return 1 if self.window is None else self.window - 1

    def window_prefix(self, terms: torch.Tensor) -> torch.Tensor:
        """The window state to pool a new chunk with (zeros for an empty cache)."""
        if self.window_state is None:
            b, h, _, c = terms.shape
            return terms.new_zeros(b, h, self.state_width(), c)
        return self.window_state

    def visible_slots(self, alpha: torch.Tensor, valid: torch.Tensor, like: torch.Tensor):
        """Cached slots a new chunk's queries may see: all but a last slot that the chunk's first
        token merges into (its partial state is superseded, spec §3)."""
        b, h, _ = alpha.shape
        if self.keys is None:
            empty = like.new_zeros(b, h, 0, like.shape[-1])
            return empty, empty, torch.zeros(b, h, 0, dtype=torch.bool, device=alpha.device)
        base = self.lengths - core.merges_into_last(alpha[..., 0], self.lengths, valid[:, 0]).long()
        slots = torch.arange(self.keys.shape[-2], device=alpha.device)
        return self.keys, self.values, slots[None, None, :] < base[..., None]

    def commit(self, alpha, valid, k_bar, v_bar, prefix, terms, sums) -> None:
        """Write a chunk: overwrite on merge, new slot on append; then the new window state.

        Args:
            alpha: hard decisions ``[B, H, n]`` (padding: 1). valid: ``[B, n]`` bool.
            k_bar, v_bar: the chunk's rotated pooled states ``[B, H, n, D]``.
            prefix, terms, sums: window state before the chunk, weighted terms of (at least) its last
                W-1 tokens, and its pooled sums (needed for an unbounded window only; else None).
        """
        b, h, n = alpha.shape
        d = k_bar.shape[-1]
        lengths = self.lengths if self.lengths is not None else alpha.new_zeros(b, h, dtype=torch.long)
        _, kept, slot, new_lengths = core.slot_writes(alpha, lengths, valid)
        size = int(new_lengths.max())
        slot = torch.where(kept, slot, size)  # size = scratch slot
        index = slot[..., None].expand(b, h, n, d)
        old = 0 if self.keys is None else self.keys.shape[-2]
        new_keys = k_bar.new_zeros(b, h, size + 1, d)
        new_values = v_bar.new_zeros(b, h, size + 1, d)
        if old:
            new_keys[..., :old, :] = self.keys
            new_values[..., :old, :] = self.values
        new_keys.scatter_(2, index, k_bar)
        new_values.scatter_(2, index, v_bar)
        self.keys, self.values = new_keys[..., :size, :], new_values[..., :size, :]
        self.lengths = new_lengths
        self.window_state = core.next_window_state(alpha, terms, self.window, prefix, sums)
        self.is_initialized = True


class DMCCache(Cache):
    """Cache of a DMC model: one :class:`DMCCacheLayer` per decoder layer.

    ``get_seq_length()`` is the number of token columns consumed so far, padding included (what
    ``generate()`` expects); ``positions`` counts the real tokens of each sequence and
    :meth:`slot_counts` the slots each head really keeps.
    """

    def __init__(self, config=None, *, num_layers: int | None = None, window: int | None = 12,
                 layer_factory: Callable[[int], SlotCacheLayer] | None = None) -> None:
        """``layer_factory(layer_idx)`` builds each layer (default: a :class:`DMCCacheLayer` of the
        model's window); caches with another storage or policy pass theirs."""
        if config is not None:
            num_layers = config.num_hidden_layers
            window = DMCConfig.from_dict(getattr(config, "dmc", None)).window
        if num_layers is None:
            raise ValueError("DMCCache needs the model config (DMCCache(model.config)) or num_layers=")
        if layer_factory is None:
            def layer_factory(layer_idx: int) -> SlotCacheLayer:
                return DMCCacheLayer(window)
        super().__init__(layers=[layer_factory(i) for i in range(num_layers)])
        self.seen_tokens = 0
        self.positions: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def real_tokens_seen(self, batch_size: int, device) -> torch.Tensor:
        """Real tokens already consumed by each sequence, ``[B]``."""
        if self.positions is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.positions

    def advance(self, valid: torch.Tensor) -> None:
        """Account for a consumed chunk (``valid``: ``[B, n]`` bool of real tokens)."""
        self.seen_tokens += valid.shape[1]
        self.positions = self.real_tokens_seen(valid.shape[0], valid.device) + valid.sum(-1)

    def slot_counts(self) -> torch.Tensor:
        """Slots each head really keeps: LongTensor ``[num_layers, B, num_kv_heads]`` (with delayed
        merging, the raw tokens of the window included)."""
        first = self.layers[0]
        if first.lengths is None and getattr(first, "pending", None) is None:
            raise ValueError("the cache is empty: run the model on some tokens first")
        counts = []
        for layer in self.layers:
            pending = layer.pending_slots() if hasattr(layer, "pending_slots") else 0
            lengths = layer.lengths if layer.lengths is not None else torch.zeros_like(pending)
            counts.append(lengths + pending)
        return torch.stack(counts)

    def _select(self, index: torch.Tensor) -> None:
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a DMC cache cannot be cropped: merged tokens cannot be taken back out")
