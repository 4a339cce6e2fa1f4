"""Scales of an fp8 KV cache (``kv_cache_dtype="fp8"``), one k and one v scale per (layer, KV head).

e4m3 keeps 3 mantissa bits over [2^-6, 448] and loses precision below (its subnormals): a head whose keys or
values are small (values of a few hundredths are common) would be stored coarsely with a scale of 1.0. A
calibrated scale maps each head's largest magnitude, times ``headroom``, to e4m3's largest value, as the
ecosystem's calibrated fp8 caches do (vLLM's ``k_scale``/``v_scale``, per tensor or per head):
``scale = headroom · amax / 448``. The magnitudes are those of what prefill stores (pooled keys after RoPE,
values), observed by the engine itself (:meth:`dmc.engine.LLM.calibrate_kv_scales`), so they include DMC's
merges; values above the calibrated range clamp to ±448 · scale.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from ..kernels.reference import FP8_MAX

# Calibration data may not reach a head's true range: a factor 2 costs one of e4m3's ~15 binary orders of
# magnitude at the bottom and leaves room above.
DEFAULT_HEADROOM = 2.0


@dataclass
class KVScales:
    """fp32 ``[num_layers, num_kv_heads]`` scales: stored = clamp(x / scale, ±448) in e4m3, read = stored · scale."""

    k: torch.Tensor
    v: torch.Tensor

    def __post_init__(self) -> None:
        self.k, self.v = self.k.detach().float().cpu(), self.v.detach().float().cpu()
        if self.k.dim() != 2 or self.k.shape != self.v.shape:
            raise ValueError(f"k and v scales must both be [num_layers, num_kv_heads], got {list(self.k.shape)} "
                             f"and {list(self.v.shape)}")
        for name, scale in (("k", self.k), ("v", self.v)):
            if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                raise ValueError(f"the {name} scales must be finite and positive")

    @classmethod
    def from_amax(cls, k_amax: torch.Tensor, v_amax: torch.Tensor, headroom: float = DEFAULT_HEADROOM) -> KVScales:
        """Scales that map ``headroom`` times each head's largest magnitude to 448; a head that stored nothing
        (amax 0) keeps 1.0."""
        if not headroom >= 1.0:
            raise ValueError(f"headroom must be >= 1 (a factor above the observed range), got {headroom!r}")

        def scale(amax: torch.Tensor) -> torch.Tensor:
            amax = amax.detach().float().cpu()
            return torch.where(amax > 0, amax * headroom / FP8_MAX, torch.ones_like(amax))

        return cls(scale(k_amax), scale(v_amax))

    def save(self, path: str | pathlib.Path) -> None:
        save_file({"k_scale": self.k.contiguous(), "v_scale": self.v.contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> KVScales:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no fp8 scales file at {path} (write one with "
                                    f"LLM.calibrate_kv_scales(prompts).save(path))")
        tensors = load_file(str(path))
        missing = {"k_scale", "v_scale"} - tensors.keys()
        if missing:
            raise ValueError(f"{path} is not an fp8 scales file: it lacks {', '.join(sorted(missing))}")
        return cls(tensors["k_scale"], tensors["v_scale"])
