"""Kernels beside the DMC math: Triton on CUDA, their PyTorch twins (built from :mod:`dmc.core`)
everywhere else and as the tests' oracle.

- :mod:`.reference`: the twins (``decode_update_ref``, ``paged_decode_attention_ref``,
  ``chunk_states_ref``); they import only core. Also the decode step of delayed merging
  (``merge_delay`` > 0: ``delayed_decode_update_ref``, ``delayed_decode_attention_ref``).
- :mod:`.triton_kernels`: the fused decode update, paged split-K decode attention, prefill pooling.
- :mod:`.triton_delayed`: the decode step of delayed merging (update with the delay ring; pages plus
  the raw window in one softmax), built from :mod:`.triton_kernels`' pieces.

``DMC_FORCE_TRITON=1`` picks Triton on any device (the tests run it on the CPU under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from .reference import (decode_update_ref, delayed_decode_attention_ref, delayed_decode_update_ref,
                        paged_decode_attention_ref)


def get_kernels(device: torch.device | str) -> SimpleNamespace:
    """``decode_update`` and ``paged_decode_attention`` for tensors on ``device``, and the delayed-merging
    step ``delayed_decode_update``/``delayed_decode_attention``."""
    if torch.device(device).type == "cuda" or os.environ.get("DMC_FORCE_TRITON") == "1":
        # Imported on demand: triton is optional on a CPU, and reads TRITON_INTERPRET when the
        # kernels are defined.
        from . import triton_delayed, triton_kernels
        return SimpleNamespace(decode_update=triton_kernels.decode_update,
                               paged_decode_attention=triton_kernels.paged_decode_attention,
                               delayed_decode_update=triton_delayed.delayed_decode_update,
                               delayed_decode_attention=triton_delayed.delayed_decode_attention)
    return SimpleNamespace(decode_update=decode_update_ref, paged_decode_attention=paged_decode_attention_ref,
                           delayed_decode_update=delayed_decode_update_ref,
                           delayed_decode_attention=delayed_decode_attention_ref)
