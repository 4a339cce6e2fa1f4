"""DMC settings stored inside a converted model's config (``config.dmc``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ATTN_IMPLEMENTATIONS = ("auto", "flex", "dense", "sdpa")


def check_attn_implementation(value: Any) -> None:
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {value!r}")


def is_dmc(obj: Any) -> bool:
    """True for a DMC model (``dmc_llama``, ``dmc_mistral``, ``dmc_qwen2``, ``dmc_qwen3``), its config,
    or its ``model_type`` string; False for stock models and anything else."""
    if not isinstance(obj, str):
        obj = getattr(getattr(obj, "config", obj), "model_type", None)
    return isinstance(obj, str) and obj.startswith("dmc_")


@dataclass
class DMCConfig:
    """Settings of Dynamic Memory Compression (spec §1-§4).

    Attributes:
        window: W, the most tokens one slot may average (12 in the paper); None = unbounded.
        init_offset: c, subtracted from k[D-1] for the decision logit and added to q[D-1]
            for the importance (5.0: merges start rare, σ(-5) ≈ 0.0067).
        temperature: τ of the Gumbel-sigmoid relaxation used in training.
        target_cr: the compression ratio the retrofit aims at (None before retrofitting).
        attn_implementation: training/eval attention: "flex" (FlexAttention score_mod, O(L)
            memory per head), "dense" (materialised (L, L) bias, the reference), "sdpa"
            (PyTorch SDPA with a boolean mask: no compilation, no gradient to α; inference
            only) or "auto" (flex on CUDA, dense on CPU where FlexAttention has no backward).
            A runtime setting, like ``compile_pooling``: see below.
        compile_pooling: on CUDA, run the pooling of training and full-sequence eval through
            ``torch.compile`` (False: eagerly).
        logit_scale: s in the decision logit ``a = s·k[D-1] - c`` (1 in the paper). A training-time
            reparametrisation (the DMS recipe scales its logit by 100): with s > 1 the decision rows
            move s times faster at the model's learning rate. :func:`dmc.hf.convert.fold_logit_scale`
            multiplies it into the k weights and resets it to 1, which the trainer does before
            saving, so released models and the engine always see s = 1.
        merge_delay: w, the most recent tokens of every head kept exact (0 in the paper). With w > 0 a
            token's decision takes effect only when it is w tokens old: the cache holds the DMC slots of
            the tokens older than w plus the last w tokens as they are, and query t attends to both
            (the delayed window of DMS, Łańcucki et al. 2025, applied to DMC's merges). The window's
            tokens count as slots in every CR. Not in the DMC paper, so 0 keeps its semantics.

    ``attn_implementation`` and ``compile_pooling`` say how a model runs, not what it computes: they
    are the initial values of the model's :class:`~dmc.hf.runtime.DMCRuntime` (given to
    :func:`dmc.convert`, or read from an older ``config.json`` that still holds them), are left out
    of :meth:`to_dict` (so never saved), and are changed on a model with
    ``model.set_dmc_mode(attn_implementation=..., compile_pooling=...)``; a model's own
    ``dmc_config`` keeps their defaults (read ``model.dmc_runtime``).
    """

    window: int | None = 12
    init_offset: float = 5.0
    temperature: float = 0.1
    target_cr: float | None = None
    attn_implementation: str = field(default="auto", metadata={"runtime": True})
    compile_pooling: bool = field(default=True, metadata={"runtime": True})
    logit_scale: float = 1.0
    merge_delay: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.merge_delay, int) or isinstance(self.merge_delay, bool) or self.merge_delay < 0:
            raise ValueError(f"DMC merge_delay must be an integer >= 0 (0 = the paper), got {self.merge_delay!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"DMC window must be a positive integer or None, got {self.window!r}")
        if self.temperature <= 0:
            raise ValueError(f"DMC temperature must be > 0, got {self.temperature}")
        if self.target_cr is not None and self.target_cr < 1:
            raise ValueError(f"target compression ratio must be >= 1 (1 = no compression), got {self.target_cr}")
        if not self.logit_scale > 0:
            raise ValueError(f"DMC logit_scale must be > 0, got {self.logit_scale}")
        check_attn_implementation(self.attn_implementation)

    def to_dict(self) -> dict[str, Any]:
        """The model's DMC semantics, as saved in ``config.dmc`` (the runtime settings left out)."""
        return {name: value for name, value in asdict(self).items() if name not in RUNTIME_FIELDS}

    def runtime_settings(self) -> dict[str, Any]:
        """The runtime settings (``attn_implementation``, ``compile_pooling``) as keyword arguments of
        :meth:`dmc.hf.runtime.DMCRuntime.update`."""
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "DMCConfig":
        """Parse ``config.dmc``; the runtime settings are accepted too (configs saved before they moved
        to :class:`~dmc.hf.runtime.DMCRuntime` hold them)."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown DMC settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# DMCConfig fields that are runtime settings (a DMCRuntime's), not model semantics: never saved.
RUNTIME_FIELDS = tuple(f.name for f in fields(DMCConfig) if f.metadata.get("runtime"))
