"""Interoperability with other DMC implementations (NVIDIA's Megatron-LM checkpoints)."""

from .megatron import MegatronImportError, import_megatron, load_megatron_checkpoint

__all__ = ["MegatronImportError", "import_megatron", "load_megatron_checkpoint"]
