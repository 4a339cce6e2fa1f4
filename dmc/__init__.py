"""dmc: Dynamic Memory Compression (Nawrot et al., ICML 2024) for Hugging Face models.

``import dmc`` registers the DMC model types with transformers' Auto classes: after it,
``AutoModelForCausalLM.from_pretrained`` loads a DMC model directory. The names below are imported
when first used (``import dmc`` itself imports neither torch nor transformers; see ``dmc._autoregister``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _autoregister
from ._lazy import lazy_attributes

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "LLM": "engine", "EngineConfig": "engine", "RequestOutput": "engine", "SamplingParams": "engine", "TokenLogprob": "engine",
    "CompressionStats": "stats",
    "DMCCache": "hf", "DMCCausalLMOutput": "hf", "UnsupportedModelError": "hf", "convert": "hf",
    "supported_architectures": "hf", "zero_decision_channels": "hf",
    "DMCConfig": "config", "is_dmc": "config",
}

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "TokenLogprob", "CompressionStats", "DMCCache", "DMCCausalLMOutput", "DMCConfig",
           "UnsupportedModelError", "convert", "is_dmc", "supported_architectures", "zero_decision_channels",
           "__version__"]

if TYPE_CHECKING:
    from .config import DMCConfig, is_dmc
    from .engine import LLM, EngineConfig, RequestOutput, SamplingParams, TokenLogprob
    from .hf import (DMCCache, DMCCausalLMOutput, UnsupportedModelError, convert, supported_architectures,
                     zero_decision_channels)
    from .stats import CompressionStats


# subpackages reachable as attributes (``dmc.hf.convert``), imported when first named
_SUBMODULES = {"baselines", "cli", "config", "core", "demo", "engine", "eval", "hf", "interop", "kernels", "serve",
               "stats", "study", "tiny", "train"}


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _EXPORTS, _SUBMODULES)


_autoregister.install()
