"""The model a training run starts from and the one it writes, by method.

``method="dmc"``: the input model as a DMC model (a stock model converted with its decision channels
zeroed, or a DMC model given this run's settings); it is written as the DMC class of its family, with
the run's target CR in its config. ``method="plain"``: the stock model as it is, written as its own
class. The objective (:mod:`dmc.train.objectives`) then only decides how each step trains it.
"""

from __future__ import annotations

import pathlib
from dataclasses import replace

import torch

from ..config import DMCConfig, is_dmc
from ..errors import one_line
from ..hf.convert import UnsupportedModelError, convert, set_logit_scale, zero_decision_channels
from ..hf.modeling import FAMILIES
from .config import ConfigError, TrainConfig


def load_weights(path: pathlib.Path, attn: str | None = None) -> torch.nn.Module:
    """The model of ``path`` in fp32; a truncated or corrupt weight file is a one-line ConfigError."""
    import transformers
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, **({"attn_implementation": attn} if attn else {}))
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load, shape mismatches: same advice
        raise ConfigError(f"cannot load the weights in {path} ({one_line(e)}); a weight file may be truncated "
                          "or corrupt: copy the model directory again") from None


def load_model(cfg: TrainConfig, path: pathlib.Path, model_type: str) -> torch.nn.Module:
    """The model ``cfg`` trains, loaded from ``path`` (whose config says ``model_type``)."""
    if cfg.method != "dmc":
        if is_dmc(model_type):
            raise ConfigError(f"{cfg.model} holds a DMC model; --method plain trains stock models (e.g. the "
                              "output of `dmc gqa`): pass one, or use --method dmc")
        # Stock attention: HF masks packed documents apart from the per-document position_ids.
        return load_weights(path, {"flex": "flex_attention"}.get(cfg.attn_implementation))
    model = load_weights(path)
    settings = DMCConfig(window=cfg.window, init_offset=cfg.init_offset, temperature=cfg.temperature,
                         target_cr=cfg.target_cr, attn_implementation=cfg.attn_implementation,
                         merge_delay=cfg.merge_delay)
    if is_dmc(model_type):
        model.set_dmc_config(settings)
        model.set_dmc_mode(**settings.runtime_settings())
        set_logit_scale(model, cfg.logit_scale)  # same decisions, rows rescaled for the training lr
        return model
    # A fresh conversion: the rows of channel D-1 are zeroed (zero-out) before any decision counts.
    try:
        model = convert(model, replace(settings, logit_scale=cfg.logit_scale))
    except UnsupportedModelError as e:
        raise ConfigError(str(e)) from e
    if "zero-out" not in cfg.stages:
        import warnings
        warnings.warn("the model is not a DMC model and the zero-out stage is skipped: zeroing the "
                      "decision channels at once (run zero-out for a gentler start)", stacklevel=3)
        zero_decision_channels(model)
    return model


def saved_class(model: torch.nn.Module) -> type:
    """The class to write ``model`` as (``model`` may be wrapped, e.g. sharded by FSDP2)."""
    for family in FAMILIES:
        if isinstance(model, family.dmc_causal_lm_class):
            return family.dmc_causal_lm_class
    return next(f for f in FAMILIES if f.model_type == model.config.model_type).causal_lm_class


def prepare_for_saving(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Last changes to the unsharded model before it is written: a DMC model records the run's target CR."""
    if getattr(model, "dmc_config", None) is not None:
        model.set_dmc_config(replace(model.dmc_config, target_cr=cfg.target_cr))
