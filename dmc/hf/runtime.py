"""How a DMC model runs now, as opposed to what it computes (``config.dmc``).

One :class:`DMCRuntime` per DMC base model, created when its attention is installed and shared by
reference with every :class:`~dmc.hf.attention.DMCAttention` layer: changing the mode changes this one
object, never the layers. It also holds the model's DMC config, parsed once. Nothing here is saved
with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..config import DMCConfig, check_attn_implementation


@dataclass
class DMCRuntime:
    """The DMC settings a model's layers read.

    Attributes:
        config: the model's :class:`~dmc.config.DMCConfig` (its semantics: window, offset, merge delay,
            ...), parsed once from ``config.dmc``; replaced by ``model.set_dmc_config``. Its runtime
            fields keep their defaults: the values in force are the ones below.
        vanilla: plain attention (every token appends, channel D-1 kept and scaled by ``channel_scale``):
            the zero-out stage and the like-for-like baseline (``model.set_dmc_mode``).
        channel_scale: μ, the multiplier of q[D-1] and k[D-1] in vanilla mode.
        attn_implementation: attention of training, full-sequence eval and a cache's first chunk:
            "auto", "flex", "dense" or "sdpa" (see :class:`~dmc.config.DMCConfig`).
        compile_pooling: on CUDA, ``torch.compile`` the pooling of training and full-sequence eval.

    The engine's benchmark knob ``forced_period`` is no runtime setting of the model: the engine passes
    it with each forward (``dmc_forced_period``).
    """

    config: DMCConfig = field(default_factory=DMCConfig)
    vanilla: bool = False
    channel_scale: float = 1.0
    attn_implementation: str = "auto"
    compile_pooling: bool = True

    def __post_init__(self) -> None:
        check_attn_implementation(self.attn_implementation)

    @classmethod
    def from_dmc_dict(cls, values: dict[str, Any] | None) -> "DMCRuntime":
        """The runtime of a model whose ``config.dmc`` is ``values``: the config parsed once; runtime
        settings an older config still holds become the initial runtime."""
        parsed = DMCConfig.from_dict(values)
        return cls(config=DMCConfig.from_dict(parsed.to_dict()), **parsed.runtime_settings())

    def update(self, **changes: Any) -> None:
        """Change settings in place (the layers hold this object); ``config`` is set with
        ``model.set_dmc_config``."""
        names = {f.name for f in fields(self)} - {"config"}
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown DMC runtime settings {sorted(unknown)}; known: {sorted(names)}")
        if "attn_implementation" in changes:
            check_attn_implementation(changes["attn_implementation"])
        for name, value in changes.items():
            setattr(self, name, value)

