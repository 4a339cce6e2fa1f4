"""Compression statistics: realized CR overall, per layer and per head.

CR is tokens seen per slot kept. Aggregates are ratios of sums (Σ tokens / Σ slots), which is
what memory follows and equals ``1 / (1 - mean α)`` over the same tokens (spec §7.5); with a
merge delay w the last w tokens of each head are slots whatever they decided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressionStats:
    """Tokens and slots per (layer, sequence, KV head), both ``[num_layers, B, H]``."""

    tokens: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def from_cache(cls, cache) -> "CompressionStats":
        """From a :class:`~dmc.hf.cache.DMCCache`: the slots heads really keep."""
        slots = cache.slot_counts().double()
        tokens = cache.positions.double()[None, :, None].expand_as(slots)
        return cls(tokens=tokens, slots=slots)

    @classmethod
    def from_decisions(cls, decisions: torch.Tensor, valid: torch.Tensor | None = None,
                       merge_delay: int = 0) -> "CompressionStats":
        """From hard decisions ``[B, num_layers, H, L]`` of a forward pass (1 = merge).

        Every real token that does not merge opens a slot; ``valid`` ``[B, L]`` excludes padding.
        With ``merge_delay`` w the last w token columns are kept raw (one slot each, whatever they
        decided): what the cache holds after this forward.
        """
        alpha = decisions.detach().double()
        if valid is None:
            valid = torch.ones(alpha.shape[0], alpha.shape[-1], dtype=torch.bool, device=alpha.device)
        if merge_delay:
            alpha = alpha.clone()
            alpha[..., -merge_delay:] = 0.0  # still raw: a slot each
        w = valid[:, None, None, :].double()
        slots = ((1 - alpha) * w).sum(-1).permute(1, 0, 2)
        tokens = w.sum(-1).expand(-1, alpha.shape[1], alpha.shape[2]).permute(1, 0, 2)
        return cls(tokens=tokens, slots=slots)

    @property
    def overall_cr(self) -> float:
        return float(self.tokens.sum() / self.slots.sum().clamp_min(1e-12))

    @property
    def per_layer_cr(self) -> torch.Tensor:
        """``[num_layers]``."""
        return self.tokens.sum((1, 2)) / self.slots.sum((1, 2)).clamp_min(1e-12)

    @property
    def per_head_cr(self) -> torch.Tensor:
        """``[num_layers, H]``, summed over the batch."""
        return self.tokens.sum(1) / self.slots.sum(1).clamp_min(1e-12)

    @property
    def per_sequence_cr(self) -> torch.Tensor:
        """``[B]``."""
        return self.tokens.sum((0, 2)) / self.slots.sum((0, 2)).clamp_min(1e-12)

    @property
    def merge_rate(self) -> float:
        """Mean α over all (layer, head, token): 1 - 1/CR."""
        return 1.0 - float(self.slots.sum() / self.tokens.sum().clamp_min(1e-12))

    def summary(self) -> dict:
        return {
            "cr": self.overall_cr,
            "merge_rate": self.merge_rate,
            "per_layer_cr": [round(float(x), 4) for x in self.per_layer_cr],
        }
