"""The inference engine: a paged per-head DMC cache, Triton kernels, continuous batching.

``dmc.LLM(model_dir).generate(prompts, dmc.SamplingParams(...))``; see :class:`LLM`.
"""

from .cache import CacheLayout, OutOfPages, PagedKVCache
from .kv_scales import KVScales
from .llm import LLM
from .params import RequestOutput, SamplingParams, TokenLogprob
from .scheduler import Request, RequestStatus

__all__ = ["LLM", "CacheLayout", "KVScales", "OutOfPages", "PagedKVCache", "Request", "RequestOutput", "RequestStatus",
           "SamplingParams", "TokenLogprob"]
