"""Where training numbers go: a JSON-lines file, TensorBoard, W&B (each on rank 0 only)."""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import torch


HISTOGRAMS = ("head_cr", "logit_mean")


class MetricsLogger:
    def __init__(self, run_dir: pathlib.Path, enabled: bool, tensorboard: bool, wandb: bool,
                 wandb_project: str, config: dict, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what a killed run logged after its last checkpoint: the resumed run redoes it.
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install 'dmc[train]'); scalars go to "
                              "metrics.jsonl only", stacklevel=2)
        if wandb:
            try:
                import wandb as wandb_module
                self.wandb = wandb_module.init(project=wandb_project, config=config,
                                               resume="allow" if resume_step is not None else None)
            except ImportError:
                warnings.warn("wandb is not installed; --wandb ignored", stacklevel=2)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{key: _finite_or_none(value) for key, value in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {}
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[key] = value
            elif isinstance(value, list):
                scalars.update({f"{key}/{i}": v for i, v in enumerate(value)})
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            for key in HISTOGRAMS:  # per-head diagnostics: one histogram besides the per-head scalars
                if isinstance(values.get(key), list) and values[key]:
                    self.tb.add_histogram(key, torch.tensor(values[key], dtype=torch.float64), step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _finite_or_none(value):
    """NaN and ±inf are not JSON: metrics.jsonl records them as null (TensorBoard and W&B get them as they are)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value
