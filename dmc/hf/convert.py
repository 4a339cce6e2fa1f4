"""Turn a stock HF causal LM into its DMC counterpart, and the stage-1 surgery (spec §5.1)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..config import DMCConfig
from .attention import DMCAttention
from .modeling import FAMILIES, Family


class UnsupportedModelError(ValueError):
    """Raised for a model that DMC cannot be retrofitted onto (yet)."""


def supported_architectures() -> list[str]:
    return [f.causal_lm_class.__name__ for f in FAMILIES]


def family_of(model: nn.Module) -> Family:
    for family in FAMILIES:
        if type(model) is family.causal_lm_class:
            return family
    if any(isinstance(model, f.dmc_causal_lm_class) for f in FAMILIES):
        raise UnsupportedModelError(f"{type(model).__name__} is already a DMC model; change its settings "
                                    "with model.set_dmc_config / set_dmc_mode or convert the original model")
    raise UnsupportedModelError(
        f"DMC does not support {type(model).__name__}; supported architectures: "
        f"{', '.join(supported_architectures())} (MHA or GQA). Load one with "
        "transformers.AutoModelForCausalLM.from_pretrained(...) and pass it to dmc.convert.")


def _check_attention(config) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        raise UnsupportedModelError(
            "this model uses sliding-window attention layers (use_sliding_window=True); DMC attention is "
            "full attention over the compressed slots. Disable the sliding window to convert it.")
    if getattr(config, "head_dim", 2) % 2:
        raise UnsupportedModelError("DMC needs an even head_dim (rotate-half RoPE pairs channel D-1 with D/2-1)")


def dmc_config_from(base_config, dmc: DMCConfig, family: Family):
    """The DMC config of a family: the base config's values plus ``dmc`` (its semantics: the runtime
    settings are not part of a model's config)."""
    values = base_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        values.pop(key, None)
    if values.get("sliding_window") is not None and family.model_type == "mistral":
        # Mistral-7B-v0.1 sets a 4K window; DMC attends over all slots instead.
        values["sliding_window"] = None
    values["dmc"] = dmc.to_dict()
    config = family.dmc_config_class(**values)
    config.architectures = [family.dmc_causal_lm_class.__name__]
    return config


def convert(model: nn.Module, config: DMCConfig | None = None) -> nn.Module:
    """Return a DMC model of the same family with the same weights (copied: ``model`` is left
    untouched). Raises :class:`UnsupportedModelError` for anything but Llama, Mistral, Qwen2
    and Qwen3 causal LMs.

    The decision channels are not touched: run :func:`zero_decision_channels` (or the
    retrofit trainer's zero-out stage) before training to start from α ≈ σ(-c).
    """
    family = family_of(model)
    _check_attention(model.config)
    config = config or DMCConfig()
    dmc_config = dmc_config_from(model.config, config, family)
    if getattr(model.config, "sliding_window", None) is not None and family.model_type == "mistral":
        import warnings
        warnings.warn(f"the model's sliding window ({model.config.sliding_window}) is dropped: DMC attention "
                      "spans every kept slot", stacklevel=2)
    with torch.device("meta"):
        new = family.dmc_causal_lm_class(dmc_config)
    new.set_dmc_mode(**config.runtime_settings())  # attn_implementation, compile_pooling: not saved
    copies: dict[int, torch.Tensor] = {}  # keep tied weights tied

    def copy(t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    new.load_state_dict({k: copy(v) for k, v in model.state_dict(keep_vars=True).items()},
                        strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (RoPE inv_freq) too
        module_name, _, attr = name.rpartition(".")
        new.get_submodule(module_name).register_buffer(
            attr, copy(buffer), persistent=attr in new.get_submodule(module_name).state_dict())
    if getattr(dmc_config, "tie_word_embeddings", False):
        new.lm_head.weight = new.model.embed_tokens.weight
    new.generation_config = model.generation_config
    new.train(model.training)
    return new


def _zero_last_rows(tensor: torch.Tensor, head_dim: int) -> None:
    """Zero channel D-1 of every head in a q/k projection weight [H*D, in] or bias [H*D]."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(tensor, DTensor):  # FSDP2-sharded: edit the full tensor, re-shard it
        full = tensor.full_tensor()
        _zero_last_rows(full, head_dim)
        tensor.copy_(distribute_tensor(full, tensor.device_mesh, tensor.placements))
        return
    tensor.view(-1, head_dim, *tensor.shape[1:])[:, -1] = 0


@torch.no_grad()
def zero_decision_channels(model: nn.Module) -> nn.Module:
    """Set to exactly 0 the rows of q_proj and k_proj (and biases) producing channel D-1 of every
    head: the end of the zero-out stage (spec §5.1). Works in place on a stock or a DMC model,
    FSDP2-sharded or not."""
    found = 0
    for module in model.modules():
        if not (hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "head_dim")):
            continue
        for proj in (module.q_proj, module.k_proj):
            _zero_last_rows(proj.weight, module.head_dim)
            if proj.bias is not None:
                _zero_last_rows(proj.bias, module.head_dim)
        found += 1
    if not found:
        raise UnsupportedModelError(f"no attention layers with q_proj/k_proj found in {type(model).__name__}")
    return model


@torch.no_grad()
def set_logit_scale(model: nn.Module, scale: float) -> nn.Module:
    """Change the decision-logit scale s of ``a = s·k[D-1] - c`` (``DMCConfig.logit_scale``) without
    changing any decision: the weights that make k[D-1] are multiplied by old/new.

    The rows of k_proj (and its bias) producing channel D-1 are rescaled; for Qwen3, whose k is
    RMS-normalised per head after the projection, the k_norm weight of channel D-1 is. In place on
    an unsharded DMC causal LM; the model's one DMC config (:meth:`set_dmc_config`) gets the new s.
    """
    old = float((getattr(model.config, "dmc", None) or {}).get("logit_scale", 1.0))
    if old == scale:
        return model
    factor = old / scale
    for module in model.modules():
        if not isinstance(module, DMCAttention):
            continue
        norm = getattr(module, "k_norm", None)
        if norm is not None:
            norm.weight[-1] *= factor
        else:
            module.k_proj.weight.view(-1, module.head_dim, module.k_proj.weight.shape[-1])[:, -1] *= factor
            if module.k_proj.bias is not None:
                module.k_proj.bias.view(-1, module.head_dim)[:, -1] *= factor
    model.set_dmc_config(replace(model.dmc_config, logit_scale=scale))
    return model


def fold_logit_scale(model: nn.Module) -> nn.Module:
    """Multiply a training-time logit scale into the weights (s = 1 afterwards): the form of the
    paper, the released checkpoints and the engine's kernels, with the same decisions. A no-op for
    stock models and for s = 1."""
    if getattr(model.config, "dmc", None) is None:
        return model
    return set_logit_scale(model, 1.0)
