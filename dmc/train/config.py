"""Retrofit configuration: every hyperparameter of spec §5, from flags or a YAML/JSON file."""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

STAGES = ("zero-out", "retrofit", "finetune")
METHODS = ("dmc", "plain")


class ConfigError(ValueError):
    """A retrofit setting that cannot work; the message says what to change."""


@dataclass
class TrainConfig:
    """Settings of ``dmc retrofit``. Defaults follow the paper's Llama-2-7B recipe (spec §5)
    where it gives one, with step counts and batch meant to be scaled to the model at hand.

    Attributes (grouped):
        model, data, out, target_cr: the input HF model directory, training data (files,
            directories, globs; .txt/.md/.py/... text, .jsonl, .parquet), output directory and
            the target compression ratio CR*.
        stages: which of "zero-out", "retrofit", "finetune" to run, in that order.
        method: "dmc" (the retrofit) or "plain": continued LM-only training of a stock model, the
            GQA up-training baseline (spec §8). Plain runs the same stage plan (so the same steps,
            tokens and lr schedule as the DMC run with these settings), data, optimiser and
            checkpoints, but converts nothing: no zero-out surgery, no decisions, no compression
            loss; it writes a stock HF model.
        seq_len: tokens per packed row (capped at the model's max positions).
        micro_batch_size, grad_accum: rows per forward and micro-steps per optimizer step; the
            global batch is micro_batch_size × grad_accum × world size rows.
        lr: peak learning rate; the paper uses the base model's final pretraining lr (3e-5 for
            Llama 2). min_lr: end of the fine-tune cosine.
        zero_out_steps: stage 1 length (μ(s) reaches 0 at 80%). steps_per_cr: retrofit steps
            per +1x of CR (6000 in the paper); retrofit_steps overrides the product.
        finetune_steps: stage 3 length at fixed CR*.
        warmup_steps: linear lr warmup at the start of each stage.
        cr_loss_weight: weight of the compression loss (1.0 in the paper).
    """

    model: str = ""
    data: list[str] = field(default_factory=list)
    out: str = ""
    target_cr: float = 4.0
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    method: str = "dmc"
    # data
    seq_len: int = 4096
    text_field: str = "text"
    val_fraction: float = 0.01
    token_cache: str | None = None
    # batch
    micro_batch_size: int = 1
    grad_accum: int = 1
    # optimisation (spec §5.2)
    lr: float = 3e-5
    min_lr: float = 3e-6
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_steps: int = 0
    zero_out_steps: int = 250
    steps_per_cr: int = 6000
    retrofit_steps: int | None = None
    finetune_steps: int = 2000
    cr_loss_weight: float = 1.0
    # DMC
    window: int | None = 12
    init_offset: float = 5.0
    temperature: float = 0.1
    attn_implementation: str = "auto"
    # runtime
    seed: int = 0
    bf16: bool | None = None  # None: on CUDA only
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile every decoder layer (removes per-op launch overhead on GPU)
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dmc"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    max_steps: int | None = None  # stop after this many global steps (the run can be resumed)

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.stages = [s.strip() for s in (self.stages.split(",") if isinstance(self.stages, str) else self.stages)]

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("no model given: pass a local Hugging Face model directory")
        if not self.data:
            raise ConfigError("no training data given: pass --data FILE|DIR|GLOB (text, .jsonl or .parquet)")
        if not self.out:
            raise ConfigError("no output directory given: pass --out DIR")
        if self.target_cr < 1:
            raise ConfigError(f"target CR must be >= 1 (1 = no compression, 4 = a quarter of the cache), "
                              f"got {self.target_cr}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose 'dmc' (retrofit DMC) or 'plain' (LM loss "
                              "only, e.g. GQA up-training of a `dmc gqa` model)")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"unknown stage(s) {unknown or self.stages}; choose from {', '.join(STAGES)}")
        if [s for s in STAGES if s in self.stages] != self.stages:
            raise ConfigError(f"stages must run in the order {', '.join(STAGES)}; got {', '.join(self.stages)}")
        for name in ("seq_len", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    @property
    def retrofit_total_steps(self) -> int:
        if self.retrofit_steps is not None:
            return self.retrofit_steps
        return round(self.steps_per_cr * (self.target_cr - 1))

    def stage_steps(self) -> list[tuple[str, int]]:
        """The stages to run with their lengths."""
        lengths = {"zero-out": self.zero_out_steps, "retrofit": self.retrofit_total_steps,
                   "finetune": self.finetune_steps}
        return [(s, lengths[s]) for s in self.stages]

    def training_identity(self) -> dict[str, Any]:
        """The settings that define a run (a different value = a different run)."""
        ignore = {"resume", "overwrite", "max_steps", "progress", "eval_every", "save_every", "keep_checkpoints",
                  "tensorboard", "wandb", "wandb_project", "token_cache", "eval_batches"}
        return {k: v for k, v in asdict(self).items() if k not in ignore}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | pathlib.Path, **overrides: Any) -> "TrainConfig":
        """Read a YAML or JSON file of the fields above; ``overrides`` win."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} in {path}; known: {', '.join(sorted(known))}")
        values.update(overrides)
        return cls(**values)
