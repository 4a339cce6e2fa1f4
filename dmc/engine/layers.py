"""The decoder layers as the decode step runs them: fused projections and fused norms.

At the engine's large batches (200-400 rows) the decode step's weight GEMMs sit near the ridge point and
its many small elementwise kernels (each RMSNorm is five, each residual add and the gated activation one
more) add up to milliseconds (``docs/results/engine_h200/``; every profile at commit 3374748). So the step:

- multiplies by q/k/v in one GEMM and by gate/up in one GEMM. The fused weight is one tensor per layer
  and the modules' own weights become views of it (:func:`fuse_projections`), so memory does not grow and
  prefill, which runs the modules, reads the same numbers;
- adds each residual and applies the next RMSNorm in one function (:func:`add_rms_norm`), and applies the
  activation and the gate product in one (:func:`gated_activation`). They are the HF modules' own
  arithmetic (``LlamaRMSNorm``, ``LlamaMLP``: same op order and dtypes, so on the CPU they give the same
  bits); on CUDA they go through ``torch.compile`` (Inductor fuses each into one kernel; ``dynamic=True``,
  one compile for every batch size, done in the CUDA graphs' warm-up before any capture).

Qwen2's q/k/v biases and Llama's ``mlp_bias`` are fused the same way; a layer whose modules are not of this
shape (no ``variance_epsilon`` norm or no gate/up/down MLP) keeps running its modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """``hidden + delta`` and its RMSNorm (``LlamaRMSNorm.forward`` on the sum): ``(sum, normed)``."""
    hidden = hidden + delta
    x = hidden.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return hidden, weight * x.to(hidden.dtype)


def gated_activation(gate_up: torch.Tensor, act) -> torch.Tensor:
    """``act(gate) * up`` of the fused gate/up projection's output ``[..., 2·I]`` (``LlamaMLP.forward``'s
    product before ``down_proj``)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


@dataclass
class DecodeLayer:
    """One decoder layer's fused weights (views of the modules' weights share them)."""

    qkv_weight: torch.Tensor  # [q + 2·kv, hidden]: q_proj, k_proj, v_proj stacked
    qkv_bias: torch.Tensor | None
    split: tuple[int, int, int]  # q, k, v output sizes
    gate_up_weight: torch.Tensor | None  # [2·I, hidden]: gate_proj, up_proj stacked (None: run layer.mlp)
    gate_up_bias: torch.Tensor | None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of ``x [B, hidden]`` (views of one GEMM's output, last dim contiguous)."""
        return F.linear(x, self.qkv_weight, self.qkv_bias).split(self.split, dim=-1)


def _stack(linears: list[torch.nn.Linear], name: str) -> torch.Tensor | None:
    """One tensor holding the linears' ``name`` ('weight'/'bias') stacked on dim 0; each module's own becomes
    a view of it (so nothing is held twice). Reused if an earlier runner fused these modules already."""
    tensors = [getattr(lin, name) for lin in linears]
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError(f"cannot fuse projections of which only some have a {name}")
    starts = [sum(t.shape[0] for t in tensors[:i]) for i in range(len(tensors))]
    fused = linears[0].__dict__.get(f"_dmc_fused_{name}")  # not a module attribute: no state_dict entry
    if fused is not None and all(t.data_ptr() == fused[start:].data_ptr() for t, start in zip(tensors, starts)):
        return fused
    with torch.no_grad():
        fused = torch.cat([t.detach() for t in tensors])
    for lin, t, start in zip(linears, tensors, starts):
        setattr(lin, name, torch.nn.Parameter(fused[start:start + t.shape[0]], requires_grad=t.requires_grad))
    linears[0].__dict__[f"_dmc_fused_{name}"] = fused
    return fused


def fuse_projections(layer: torch.nn.Module) -> DecodeLayer:
    """Fuse one decoder layer's q/k/v and gate/up projections (see the module docstring)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    gated = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    gate_up = [mlp.gate_proj, mlp.up_proj] if gated else None
    return DecodeLayer(qkv_weight=_stack(qkv, "weight"), qkv_bias=_stack(qkv, "bias"),
                       split=tuple(lin.out_features for lin in qkv),
                       gate_up_weight=_stack(gate_up, "weight") if gated else None,
                       gate_up_bias=_stack(gate_up, "bias") if gated else None)


def is_rms_norm(norm: torch.nn.Module) -> bool:
    """A norm :func:`add_rms_norm` computes exactly: HF's Llama-style RMSNorm (``weight``, ``variance_epsilon``)."""
    return type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon") \
        and getattr(norm, "weight", None) is not None


def functional_activation(act: torch.nn.Module):
    """The function an HF activation module computes, where it is one of torch's (so that one compiled
    :func:`gated_activation` serves every layer: a module argument would be guarded by identity, one compile
    per layer); None otherwise (the layer's module is called as it is)."""
    if type(act).__name__ == "SiLUActivation" or isinstance(act, torch.nn.SiLU):
        return F.silu
    return None


class DecodeOps:
    """The fused functions of the decode step on one device: compiled on CUDA (``DMC_COMPILE_DECODE=0``
    turns that off), the plain functions elsewhere."""

    def __init__(self, device: torch.device) -> None:
        compile_it = device.type == "cuda" and os.environ.get("DMC_COMPILE_DECODE", "1") != "0"
        wrap = (lambda fn: torch.compile(fn, dynamic=True)) if compile_it else (lambda fn: fn)
        self.compiled = compile_it
        self._add_rms_norm = wrap(add_rms_norm)
        self._silu_gate = wrap(lambda gate_up: gated_activation(gate_up, F.silu))

    def add_norm(self, hidden: torch.Tensor, delta: torch.Tensor, norm: torch.nn.Module):
        """``hidden + delta`` and ``norm`` of it: ``(sum, normed)``, fused for an RMSNorm."""
        if is_rms_norm(norm):
            return self._add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)
        hidden = hidden + delta
        return hidden, norm(hidden)

    def mlp(self, layer: torch.nn.Module, fused: DecodeLayer, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP on ``x``: one gate/up GEMM and the fused activation where it can, else the module."""
        mlp = layer.mlp
        if fused.gate_up_weight is None:
            return mlp(x)
        gate_up = F.linear(x, fused.gate_up_weight, fused.gate_up_bias)
        if functional_activation(mlp.act_fn) is F.silu:
            return mlp.down_proj(self._silu_gate(gate_up))
        return mlp.down_proj(gated_activation(gate_up, mlp.act_fn))
