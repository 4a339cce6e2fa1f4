"""Baselines the paper compares DMC against (spec §8)."""

from .eviction import EvictionCache, EvictionPolicy, budget_for
from .gqa import mean_pool_kv_heads

__all__ = ["EvictionCache", "EvictionPolicy", "budget_for", "mean_pool_kv_heads"]
