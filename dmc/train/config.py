"""Retrofit configuration: every hyperparameter of spec §5, from flags or a YAML/JSON file."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import one_line

STAGES = ("zero-out", "retrofit", "finetune", "hard")
METHODS = ("dmc", "plain")


# Recipe settings left unset (None) take their value from the preset: this project's recipe by
# default, or "paper" = spec §5 exactly, what the paper's Llama-2 runs did (the project's levers off).
RECIPE_DEFAULTS = {"logit_scale": 10.0, "cr_constraint": "dual", "cr_two_sided": True, "noise_end": 0.0,
                   "stages": ["zero-out", "retrofit", "finetune", "hard"]}
PRESETS = {
    "paper": {"merge_delay": 0, "logit_scale": 1.0, "cr_constraint": "hinge", "cr_two_sided": False, "distill_weight": 0.0, "noise_end": 1.0,
              "hard_steps": 0, "stages": ["zero-out", "retrofit", "finetune"]},
}
DISTILL_DIRECTIONS = ("forward", "reverse")
CR_CONSTRAINTS = ("hinge", "dual")


# Attention implementations that train (DMCConfig's "sdpa" gives no gradient to the decisions).
TRAIN_ATTN_IMPLEMENTATIONS = ("auto", "flex", "dense")


# Delayed merging by default (merge_delay None): 32 raw tokens, or a quarter of the slots a row keeps at the
# target CR when that is less. Measured on SmolLM2-135M (docs/retrofit-recipe.md, "Delayed merging"): 32 at 2x,
# 4x and 8x on 1024-token rows (where 32 <= a quarter of the slots) met every quality target set for the recipe.
MERGE_DELAY_CAP = 32


def auto_merge_delay(seq_len: int, target_cr: float) -> int:
    """The default merge delay: ``min(32, slots / 4)`` with ``slots = seq_len / target_cr``."""
    return max(0, min(MERGE_DELAY_CAP, int(seq_len / target_cr) // 4))


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
        stages: which of "zero-out", "retrofit", "finetune", "hard" to run, in that order (default:
            all of the preset's; the paper has no "hard" stage).
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
        cr_loss_weight: weight of the compression loss (1.0 in the paper); with
            cr_constraint="dual" the weight it starts from and never goes below.
        preset: "paper" fills every setting not given explicitly with spec §5's recipe
            (logit scale 1, fixed CR-loss weight, LM loss only, constant noise, no hard stage);
            None (default) keeps the defaults below, this project's recipe.

    Recipe levers (see docs/retrofit-recipe.md for what each one moved on a real model):
        logit_scale: s in a = s·k[D-1] - c during training (folded into the weights on save): the
            decision rows move s times faster at the model's lr (the DMS recipe uses 100).
        cr_constraint: "hinge" (spec §4: the one-sided loss with a fixed weight) or "dual"
            (that loss with a dual-ascent multiplier that grows while the achieved CR lags the
            schedule, so compression keeps up with the ramp). cr_dual_rate: log-weight step per
            unit of relative CR shortfall (0.5: on SmolLM2-135M at 4x the realized CR landed closer to the
            target than at 3, same perplexity, and the multiplier peaked at 86 instead of its cap;
            docs/retrofit-recipe.md); cr_dual_max: the largest multiplier.
        cr_two_sided: in the fine-tune and hard stages (fixed CR*) also penalise compressing more
            than CR* (the paper's loss is one-sided: the realized CR could overshoot the target).
        max_head_cr, head_ceiling_weight: optional per-(layer, head) CR ceiling and its weight,
            relative to the CR loss's current weight (> 1: a head over the ceiling is pushed down
            even while the whole model is pushed to compress more).
        distill_weight: weight of the KL to a frozen teacher's logits (None: 1 for method dmc, 0
            for plain); teacher: its HF directory (default: the input model, i.e. the original);
            distill_temperature, distill_direction ("forward" = KL(teacher‖student), "reverse").
        lm_weight: weight of the LM cross-entropy (0: distillation only, as in DMS).
        noise_end: scale of the Gumbel noise at the end of the fine-tune, annealed linearly from
            1 (1 = the paper's constant noise; 0 = the fine-tune ends with inference's decisions).
        hard_steps: length of the last stage, "hard": fixed CR*, no noise, the inference forward
            (hard decisions and the §3 mask), so training ends on the loss inference sees
            (None: a quarter of finetune_steps).
        temperature: the Gumbel-sigmoid τ of the relaxed decisions (not a sampling temperature).
        merge_delay: w, the last w tokens of every head kept exact, a token merging only once it is
            w tokens old (DMS's delayed window applied to merges; 0 = the paper and the "paper" preset;
            see :class:`dmc.DMCConfig`). None (default): :func:`auto_merge_delay`, min(32, a quarter
            of the slots of a seq_len row at target_cr). Saved with the model: it is inference
            semantics. The window counts in the CR, so it must stay below seq_len / target_cr.
    """

    model: str = ""
    data: list[str] = field(default_factory=list)
    out: str = ""
    target_cr: float = 4.0
    stages: list[str] | None = None  # None: every stage of the preset
    method: str = "dmc"
    # data
    seq_len: int = 4096
    text_field: str = "text"
    val_fraction: float = 0.01
    token_cache: str | None = None
    on_bad_file: str = "skip"  # files that are not UTF-8 text: "skip" (named in a warning) or "error"
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
    preset: str | None = None
    # recipe levers (docs/retrofit-recipe.md; the "paper" preset turns them off)
    logit_scale: float | None = None
    cr_constraint: str | None = None
    cr_dual_rate: float = 0.5
    cr_dual_max: float = 1e4
    cr_two_sided: bool | None = None
    max_head_cr: float | None = None
    head_ceiling_weight: float = 2.0
    distill_weight: float | None = None
    teacher: str | None = None
    distill_temperature: float = 1.0
    distill_direction: str = "forward"
    lm_weight: float = 1.0
    noise_end: float | None = None
    hard_steps: int | None = None
    merge_delay: int | None = None
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
    # checkpoints kept while training; a finished run keeps its last one only, unless "all" (or 0)
    keep_checkpoints: str | int = 2
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dmc"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    max_steps: int | None = None  # stop after this many global steps (the run can be resumed)
    nan_patience: int = 0  # further steps with a non-finite loss tolerated before the run stops

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        chosen = {**RECIPE_DEFAULTS, **PRESETS.get(self.preset, {})}
        for key, value in chosen.items():
            if getattr(self, key) is None:  # explicit settings win over the preset
                setattr(self, key, list(value) if isinstance(value, list) else value)
        if self.merge_delay is None and isinstance(self.seq_len, int) and isinstance(self.target_cr, (int, float)) \
                and self.target_cr >= 1:
            self.merge_delay = auto_merge_delay(self.seq_len, self.target_cr)
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.keep_checkpoints, str) and self.keep_checkpoints.strip().lstrip("-").isdigit():
            self.keep_checkpoints = int(self.keep_checkpoints)  # given on the command line or as YAML text
        self.stages = [s.strip() for s in (self.stages.split(",") if isinstance(self.stages, str) else self.stages)]

    def validate(self) -> None:
        self._validate_types()
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other (continue the run in --out, or "
                              "discard it): pass only one (check `resume:`/`overwrite:` in a config file)")
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
        self._validate_ranges()
        if self.on_bad_file not in ("skip", "error"):
            raise ConfigError(f"on_bad_file must be skip or error, got {self.on_bad_file!r}")
        self._validate_recipe()

    def _validate_types(self) -> None:
        """Every setting has its field's type (a config file or the Python API can pass anything)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, _field_types()[f.name]):
                raise ConfigError(f"{f.name} must be {_describe(_field_types()[f.name])}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")

    def _validate_ranges(self) -> None:
        for name in ("zero_out_steps", "steps_per_cr", "retrofit_steps", "finetune_steps", "warmup_steps",
                     "nan_patience"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        keep = self.keep_checkpoints
        if isinstance(keep, str) and keep.strip().lower() != "all" or isinstance(keep, int) and keep < 0:
            raise ConfigError(f"keep_checkpoints must be >= 0 or \"all\", got {keep!r}")
        for name in ("eval_every", "save_every", "eval_batches", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (a number of steps; use a large one to do it rarely), "
                                  f"got {value}")
        if sum(length for _, length in self.stage_steps()) < 1:
            raise ConfigError(f"the plan has no steps ({', '.join(f'{n} {k}' for n, k in self.stage_steps())}); "
                              "give the stages some steps")
        if self.min_lr < 0:
            raise ConfigError(f"min_lr must be >= 0, got {self.min_lr}")
        for name in ("weight_decay", "cr_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not self.text_field:
            raise ConfigError("text_field must name the JSON/parquet field holding the text (default: text)")
        if self.attn_implementation not in TRAIN_ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation must be one of {', '.join(TRAIN_ATTN_IMPLEMENTATIONS)} for "
                              f"training, got {self.attn_implementation!r}")
        from ..config import DMCConfig
        try:
            DMCConfig(window=self.window, init_offset=self.init_offset, temperature=self.temperature,
                      target_cr=self.target_cr, attn_implementation=self.attn_implementation,
                      merge_delay=self.merge_delay)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.check_merge_delay(self.seq_len)

    def check_merge_delay(self, seq_len: int, model_capped: bool = False) -> None:
        """The raw tokens of delayed merging count as slots, so they must stay below what a row of ``seq_len``
        tokens keeps at the target CR. ``model_capped``: seq_len is the model's context, not the setting."""
        if self.method != "dmc" or not self.merge_delay or seq_len / self.target_cr > self.merge_delay:
            return
        rows, fix = ((f"the model's {seq_len}-token rows", "") if model_capped else
                     (f"a {seq_len}-token row", ", a longer seq_len"))
        raise ConfigError(f"merge_delay {self.merge_delay} keeps more raw tokens than CR {self.target_cr:g} allows in "
                          f"{rows} ({seq_len / self.target_cr:.0f} slots): use a merge_delay below that{fix} or a "
                          "lower target CR")

    def _validate_recipe(self) -> None:
        if not self.logit_scale > 0:
            raise ConfigError(f"logit_scale must be > 0 (1 = the paper), got {self.logit_scale}")
        if self.cr_constraint not in CR_CONSTRAINTS:
            raise ConfigError(f"cr_constraint must be one of {', '.join(CR_CONSTRAINTS)}, got {self.cr_constraint!r}")
        if self.cr_dual_rate < 0 or self.cr_dual_max < 1:
            raise ConfigError("cr_dual_rate must be >= 0 and cr_dual_max >= 1")
        if self.max_head_cr is not None and self.max_head_cr <= 1:
            raise ConfigError(f"max_head_cr must be > 1 (or none), got {self.max_head_cr}")
        if self.distill_direction not in DISTILL_DIRECTIONS:
            raise ConfigError(f"distill_direction must be one of {', '.join(DISTILL_DIRECTIONS)}, "
                              f"got {self.distill_direction!r}")
        if self.distillation_weight < 0 or self.lm_weight < 0 or self.distillation_weight + self.lm_weight == 0:
            raise ConfigError("distill_weight and lm_weight must be >= 0 and not both 0")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if not 0 <= self.noise_end <= 1:
            raise ConfigError(f"noise_end must be in [0, 1] (a fraction of the Gumbel noise), got {self.noise_end}")
        if self.hard_steps is not None and self.hard_steps < 0:
            raise ConfigError(f"hard_steps must be >= 0, got {self.hard_steps}")

    @property
    def retrofit_total_steps(self) -> int:
        if self.retrofit_steps is not None:
            return self.retrofit_steps
        return round(self.steps_per_cr * (self.target_cr - 1))

    @property
    def hard_total_steps(self) -> int:
        return self.finetune_steps // 4 if self.hard_steps is None else self.hard_steps

    @property
    def distillation_weight(self) -> float:
        if self.distill_weight is not None:
            return self.distill_weight
        return 1.0 if self.method == "dmc" else 0.0

    @property
    def keep_all_checkpoints(self) -> bool:
        """Every checkpoint stays, also once the run is finished (``keep_checkpoints`` "all" or 0)."""
        keep = self.keep_checkpoints
        return keep == 0 or isinstance(keep, str) and keep.strip().lower() == "all"

    @property
    def checkpoints_kept(self) -> int:
        """Checkpoints kept while training (0: all)."""
        return 0 if self.keep_all_checkpoints else int(self.keep_checkpoints)

    def stage_steps(self) -> list[tuple[str, int]]:
        """The stages to run with their lengths."""
        lengths = {"zero-out": self.zero_out_steps, "retrofit": self.retrofit_total_steps,
                   "finetune": self.finetune_steps, "hard": self.hard_total_steps}
        return [(s, lengths[s]) for s in self.stages]

    def training_identity(self) -> dict[str, Any]:
        """The settings that define a run (a different value = a different run)."""
        ignore = {"resume", "overwrite", "max_steps", "progress", "eval_every", "save_every", "keep_checkpoints",
                  "tensorboard", "wandb", "wandb_project", "token_cache", "on_bad_file", "eval_batches", "nan_patience",
                  "out"}  # a run directory that was moved or renamed is still the same run
        return {k: v for k, v in asdict(self).items() if k not in ignore}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | pathlib.Path, **overrides: Any) -> "TrainConfig":
        """Read a YAML or JSON file of the fields above; ``overrides`` win. Numbers written as text
        (YAML reads ``3e-5`` as a string) are converted; any other wrong type is a :class:`ConfigError`
        naming the file and the setting."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                              f"config file {path} is not a file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"could not read the config file {path} ({one_line(e)})") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or one_line(e)}"
                                  ) from None
        else:
            try:
                values = json.loads(text) if text.strip() else None
            except json.JSONDecodeError as e:
                hint = "" if path.suffix == ".json" else " (a YAML file needs a .yaml or .yml name)"
                raise ConfigError(f"{path} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}"
                                  ) from None
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings (name: value), not a {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} in {path}; known: {', '.join(sorted(known))}")
        for name, value in values.items():
            values[name] = value = _coerce(value, _field_types()[name])
            if not _has_type(value, _field_types()[name]):
                raise ConfigError(f"{name} in {path} must be {_describe(_field_types()[name])}, got {value!r}")
        values.update(overrides)
        return cls(**values)


# ------------------------------------------------------------------------------ setting types
@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _options(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _has_type(value, hint) -> bool:
    for option in _options(hint):
        if option is type(None):
            if value is None:
                return True
        elif option is bool:
            if isinstance(value, bool):
                return True
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif option is str:
            if isinstance(value, str):
                return True
        elif typing.get_origin(option) is list:
            # a list of the item type; a single string stands for a one-item list (data, stages)
            item = (typing.get_args(option) or (str,))[0]
            if isinstance(value, str) or (isinstance(value, list) and all(_has_type(v, item) for v in value)):
                return True
    return False


def _coerce(value, hint):
    """Numbers and booleans given as text (YAML reads 3e-5 as a string), numbers given as integers."""
    options = _options(hint)
    if not isinstance(value, str) or str in options or any(typing.get_origin(o) is list for o in options):
        return value
    text = value.strip().lower()
    if type(None) in options and text in ("none", "null", "~", ""):
        return None
    if bool in options and text in ("true", "yes", "on", "false", "no", "off"):
        return text in ("true", "yes", "on")
    for kind in (int, float):
        if kind in options:
            try:
                return kind(text)
            except ValueError:
                pass
    return value


def _describe(hint) -> str:
    names = []
    for option in _options(hint):
        if option is type(None):
            names.append("none")
        elif option is bool:
            names.append("true or false")
        elif option is int:
            names.append("an integer")
        elif option is float:
            names.append("a number")
        elif option is str:
            names.append("a string")
        elif typing.get_origin(option) is list:
            names.append("a list of strings")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)
