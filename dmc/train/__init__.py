"""The retrofit trainer (spec §5): zero-out → retrofit → fine-tune, one GPU to many (FSDP2); with
``method="plain"`` the same loop continues training a stock model (GQA up-training, spec §8).

The trainer (torch, transformers) is imported when first used: ``dmc retrofit --help`` and the
settings (``dmc.train.config``) need neither."""

from .config import METHODS, STAGES, ConfigError, TrainConfig

__all__ = ["METHODS", "STAGES", "ConfigError", "Retrofitter", "TrainConfig", "retrofit"]


def __getattr__(name: str):
    if name in ("Retrofitter", "retrofit"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'dmc.train' has no attribute {name!r}")
