"""The inference engine: a paged per-head DMC cache, Triton kernels, continuous batching.

``dmc.LLM(model_dir).generate(prompts, dmc.SamplingParams(...))``; see :class:`LLM` and, for its settings,
:class:`EngineConfig`. The names below are imported when first used, so that ``dmc.engine.config`` (what the
commands build their flags from) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS)
