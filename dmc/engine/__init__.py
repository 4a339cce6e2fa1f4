"""The inference engine: a paged per-head DMC cache, Triton kernels, continuous batching.

``dmc.LLM(model_dir).generate(prompts, dmc.SamplingParams(...))``; see :class:`LLM` and, for its settings,
:class:`EngineConfig`. The names below are imported when first used, so that ``dmc.engine.config`` (what the
commands build their flags from) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module of this package that defines it
_EXPORTS = {"CacheLayout": "cache", "OutOfPages": "cache", "PagedKVCache": "cache", "EngineConfig": "config",
            "KVScales": "kv_scales", "LLM": "llm", "RequestOutput": "params", "SamplingParams": "params",
            "TokenLogprob": "params", "Request": "scheduler", "RequestStatus": "scheduler"}

__all__ = ["LLM", "CacheLayout", "EngineConfig", "KVScales", "OutOfPages", "PagedKVCache", "Request", "RequestOutput",
           "RequestStatus", "SamplingParams", "TokenLogprob"]

if TYPE_CHECKING:
    from .cache import CacheLayout, OutOfPages, PagedKVCache
    from .config import EngineConfig
    from .kv_scales import KVScales
    from .llm import LLM
    from .params import RequestOutput, SamplingParams, TokenLogprob
    from .scheduler import Request, RequestStatus


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dmc.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
