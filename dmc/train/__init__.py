"""The retrofit trainer (spec §5): zero-out → retrofit → fine-tune, one GPU to many (FSDP2)."""

from .config import STAGES, ConfigError, TrainConfig
from .trainer import Retrofitter, retrofit

__all__ = ["STAGES", "ConfigError", "Retrofitter", "TrainConfig", "retrofit"]
