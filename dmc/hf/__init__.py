"""Hugging Face integration: DMC configs, models, cache and conversion."""

from .attention import DMCAttention
from .cache import DMCCache, DMCCacheLayer
from .convert import (UnsupportedModelError, convert, fold_logit_scale, supported_architectures,
                      zero_decision_channels)
from .modeling import FAMILIES, DMCCausalLMOutput, DMCForCausalLMMixin, compile_decoder_layers
from .runtime import DMCRuntime

__all__ = ["DMCAttention", "DMCCache", "DMCCacheLayer", "DMCCausalLMOutput", "DMCForCausalLMMixin", "DMCRuntime", "FAMILIES",
           "compile_decoder_layers", "fold_logit_scale",
           "UnsupportedModelError", "convert", "supported_architectures", "zero_decision_channels"]
