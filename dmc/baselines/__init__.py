"""Baselines the paper compares DMC against (spec §8)."""

from .gqa import mean_pool_kv_heads

__all__ = ["mean_pool_kv_heads"]
