"""The decode-step kernels for a device: Triton on CUDA, the PyTorch twins elsewhere.

``DMC_FORCE_TRITON=1`` picks Triton on any device (the tests run it on the CPU under
``TRITON_INTERPRET=1``). The page allocator is the twin everywhere: a few tensor ops, no kernel.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from .reference import allocate_pages_ref, decode_update_ref, paged_decode_attention_ref


def get_kernels(device: torch.device | str) -> SimpleNamespace:
    """``decode_update``, ``paged_decode_attention`` and ``allocate_pages`` for tensors on ``device``."""
    if torch.device(device).type == "cuda" or os.environ.get("DMC_FORCE_TRITON") == "1":
        # Imported on demand: triton reads TRITON_INTERPRET when the kernels are defined.
        from . import triton_kernels
        return SimpleNamespace(decode_update=triton_kernels.decode_update,
                               paged_decode_attention=triton_kernels.paged_decode_attention,
                               allocate_pages=allocate_pages_ref)
    return SimpleNamespace(decode_update=decode_update_ref, paged_decode_attention=paged_decode_attention_ref,
                           allocate_pages=allocate_pages_ref)
