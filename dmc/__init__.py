"""dmc: Dynamic Memory Compression (Nawrot et al., ICML 2024) for Hugging Face models.

``import dmc`` registers the DMC model types with transformers' Auto classes.
"""

from .config import DMCConfig, is_dmc
from .hf import (DMCCache, DMCCausalLMOutput, UnsupportedModelError, convert, supported_architectures,
                 zero_decision_channels)
from .engine import LLM, RequestOutput, SamplingParams
from .stats import CompressionStats

__version__ = "0.1.0"

__all__ = ["LLM", "RequestOutput", "SamplingParams", "CompressionStats", "DMCCache", "DMCCausalLMOutput", "DMCConfig", "UnsupportedModelError",
           "convert", "is_dmc", "supported_architectures", "zero_decision_channels", "__version__"]
