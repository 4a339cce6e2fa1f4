"""The retrofit trainer (spec §5): zero-out → retrofit → fine-tune, one GPU to many (FSDP2); with
``method="plain"`` the same loop continues training a stock model (GQA up-training, spec §8)."""

from .config import METHODS, STAGES, ConfigError, TrainConfig
from .trainer import Retrofitter, retrofit

__all__ = ["METHODS", "STAGES", "ConfigError", "Retrofitter", "TrainConfig", "retrofit"]
