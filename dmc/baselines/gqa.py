"""GQA up-training's starting point (Ainslie et al. 2023; spec §8): mean-pool K/V heads into groups.

CR r → num_key_value_heads / r KV heads: the k_proj and v_proj rows (and biases) of each group of r
consecutive KV heads are averaged. The result is a stock model of the same family, to be trained
further on the same data and budget as DMC (without the DMC loss).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..hf.convert import family_of


def _pool_rows(tensor: torch.Tensor, heads: int, ratio: int, head_dim: int) -> torch.Tensor:
    rest = tensor.shape[1:]
    return tensor.view(heads // ratio, ratio, head_dim, *rest).mean(dim=1).reshape(-1, *rest)


@torch.no_grad()
def mean_pool_kv_heads(model: nn.Module, ratio: int) -> nn.Module:
    """Return a copy of ``model`` with ``num_key_value_heads / ratio`` KV heads (input untouched).

    Raises UnsupportedModelError for models dmc.convert does not support, ValueError when the KV
    heads do not split into groups of ``ratio``.
    """
    family_of(model)  # the same families as DMC, with the same clear error
    config = model.config
    heads = config.num_key_value_heads
    if ratio < 1 or heads % ratio:
        raise ValueError(f"cannot mean-pool {heads} KV heads into groups of {ratio}: pick a divisor of {heads}")
    new = copy.deepcopy(model)
    if ratio == 1:
        return new
    new.config.num_key_value_heads = heads // ratio
    for layer in new.model.layers:
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            pooled = nn.Linear(old.in_features, old.out_features // ratio, bias=old.bias is not None,
                               device=old.weight.device, dtype=old.weight.dtype)
            pooled.weight.copy_(_pool_rows(old.weight, heads, ratio, attn.head_dim))
            if old.bias is not None:
                pooled.bias.copy_(_pool_rows(old.bias, heads, ratio, attn.head_dim))
            setattr(attn, name, pooled)
        attn.num_key_value_groups = config.num_attention_heads // (heads // ratio)
    return new


__all__ = ["mean_pool_kv_heads"]
