"""What a training step optimises: one object per method, so the trainer has a single loop.

An objective owns what differs between methods in a step: its mode and loss, the noise it draws, what
happens at the end of a stage, the numbers it adds to the step's metrics and the evaluation, the state
it carries across steps (checkpointed) and the end-of-run report. Which model is loaded and written
is :mod:`dmc.train.models`. :class:`Retrofitter
<dmc.train.trainer.Retrofitter>` takes any object with this interface (``objective=``).

- :class:`LMObjective` (``method="plain"``): next-token cross-entropy of a stock model (continued
  training, GQA up-training), optionally plus distillation; its hooks are no-ops.
- :class:`DMCObjective` (``method="dmc"``): the retrofit of spec §4-§5: LM loss, distillation from a
  frozen teacher, the compression loss with a fixed weight (paper) or a dual-ascent multiplier, an
  optional per-head CR ceiling; the stage decides the mode (zero-out: plain attention with μ(s);
  retrofit: CR ramp; fine-tune: fixed CR with the noise annealed; hard: the inference forward).

Every number an objective adds to the step's metrics is a sum over micro-steps (``Totals``) that the
trainer all-reduces, so the logged values are the same on one GPU and many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import core
from ..hf.convert import zero_decision_channels
from .config import TrainConfig
from .diagnostics import HeadDiagnostics, format_summary
from .distributed import Runtime, all_reduce_sum


@dataclass
class StepMode:
    """How one global step runs (a pure function of the step: resumes are exact)."""

    stage: str
    target_cr: float | None = None  # None: no compression loss (zero-out, plain)
    noise_scale: float = 1.0
    hard: bool = False
    channel_scale: float | None = None  # zero-out: μ(s), plain attention


def noise_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The Gumbel noise of one micro-step: a function of (seed, step, rank, micro-step)."""
    mixed = (seed * 1_000_003 + step) * 1_009 + rank * 101 + micro
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0, direction: str = "forward") -> torch.Tensor:
    """Mean over masked positions of KL between teacher and student next-token distributions.

    Args:
        student, teacher: logits ``[B, L, V]`` of the same positions.
        mask: ``[B, L]`` bool, the positions that have a next token to predict.
        temperature: T; both distributions are softened by it and the loss is scaled by T² (Hinton
            et al.), so its gradient keeps the same size across T.
        direction: "forward" = KL(teacher ‖ student) (mass-covering, the usual distillation);
            "reverse" = KL(student ‖ teacher) (mode-seeking).
    """
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if direction == "forward":
        kl = (t.exp() * (t - s)).sum(-1)
    elif direction == "reverse":
        kl = (s.exp() * (s - t)).sum(-1)
    else:
        raise ValueError(f"distillation direction must be 'forward' or 'reverse', got {direction!r}")
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp_min(1) * temperature ** 2


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: logits at t are scored iff token t+1 is a label (HF's shift)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


class Teacher:
    """A frozen copy of the original model whose logits the student is distilled towards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        return self.model(batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits


class Evaluation:
    """What an objective adds to the held-out LM loss, summed over evaluation batches: nothing
    for a stock model."""

    def add(self, batch, out, n: float, forward) -> None:
        """One batch: its eval-mode output ``out`` (``n`` scored tokens); ``forward(fn, *args)``
        runs another forward under the trainer's autocast."""

    def values(self, lm: dict, runtime: Runtime) -> dict:
        """The numbers of all batches, all-reduced over ``runtime``, beside ``lm`` (val_loss...)."""
        return {}


class LMObjective:
    """Continued training of a stock model on the LM loss (plus distillation if a teacher is set)."""

    name = "plain"
    dmc = False
    label = "train (plain)"  # of the progress bar

    def __init__(self, cfg: TrainConfig, teacher: Teacher | None = None) -> None:
        self.cfg, self.teacher = cfg, teacher

    # one step
    def mode(self, pos) -> StepMode:
        return StepMode(pos.name)

    def apply_mode(self, model, mode: StepMode) -> None:
        pass

    def noise(self, seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator | None:
        """The RNG of a micro-step's forward (None: the forward draws no noise)."""
        return None

    def forward(self, model, batch, mode: StepMode, generator):
        """(model output, LM loss) of one batch in ``mode`` (``"eval"``: the eval-mode forward)."""
        out = model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids, use_cache=False)
        return out, out.loss

    def loss(self, model, batch, mode: StepMode, generator) -> tuple[torch.Tensor, object, dict]:
        """(loss to backpropagate, model output, {metric: scalar tensor summed over micro-steps})."""
        out, lm_loss = self.forward(model, batch, mode, generator)
        parts = {"lm_loss": lm_loss.detach()}
        loss = self.cfg.lm_weight * lm_loss if self.teacher is not None else lm_loss
        if self.teacher is not None:
            kd = distillation_loss(out.logits, self.teacher.logits(batch), next_token_mask(batch.labels),
                                   self.cfg.distill_temperature, self.cfg.distill_direction)
            loss = loss + self.cfg.distillation_weight * kd
            parts["distill_loss"] = kd.detach()
        return loss, out, parts

    def step_sums(self, out, mode: StepMode) -> dict[str, torch.Tensor]:
        """float64 tensors of one micro-step's output that the trainer sums over micro-steps and
        ranks and hands to :meth:`step_values` (besides the loss terms of :meth:`loss`)."""
        return {}

    def step_values(self, mode: StepMode, sums: dict[str, torch.Tensor], seq_len: int) -> dict:
        """The numbers a step adds to its metrics from the reduced :meth:`step_sums`."""
        return {}

    def on_stage_end(self, model, stage: str) -> None:
        """Called after the optimizer step of the last step of ``stage``."""

    # evaluation and the report
    def eval_forward(self, model, batch):
        return self.forward(model, batch, StepMode("eval"), None)

    def evaluation(self, model, device: torch.device) -> Evaluation:
        return Evaluation()

    def summary(self, values: dict) -> str:
        """The end-of-run report printed from the last evaluation's ``values`` ("": none)."""
        return ""

    # state carried across steps (checkpointed)
    def after_step(self, mode: StepMode, achieved_cr: float | None) -> dict:
        """The update of that state once per global step, from the step's achieved CR (None: no
        decisions were taken); returns the numbers it adds to the step's metrics."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DMCEvaluation(Evaluation):
    """Realized CR with hard decisions, per-head diagnostics, and the same batches in training mode
    (relaxed decisions with noise from a fixed seed): val_loss_relaxed - val_loss is what
    inference's hard decisions cost. A model in plain attention (zero-out) has only val_cr = 1."""

    def __init__(self, objective: "DMCObjective", model, device: torch.device) -> None:
        self.objective, self.model = objective, model
        self.decisions = not model.model.dmc_runtime.vanilla
        cfg = objective.cfg
        self.generator = torch.Generator(device).manual_seed(cfg.seed + 1) if self.decisions else None
        self.relaxed_mode = StepMode("relaxed", target_cr=cfg.target_cr)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # tokens, slots, relaxed·n, n
        self.diagnostics = HeadDiagnostics()

    def add(self, batch, out, n: float, forward) -> None:
        if not self.decisions:
            return
        tokens, slots = float(out.compression.tokens.sum()), float(out.compression.slots.sum())
        self.diagnostics.add(out)
        self.model.train()
        relaxed = float(forward(self.objective.forward, self.model, batch, self.relaxed_mode, self.generator)[1])
        self.sums += torch.tensor([tokens, slots, relaxed * n, n], dtype=torch.float64, device=self.sums.device)

    def values(self, lm: dict, runtime: Runtime) -> dict:
        tokens, slots, relaxed, n = all_reduce_sum(self.sums, runtime)
        values = {"val_cr": float(tokens / slots) if slots > 0 else 1.0}
        if self.decisions:
            values["val_loss_relaxed"] = float(relaxed / n)
            values["relaxation_gap"] = lm["val_loss"] - values["val_loss_relaxed"]
            values.update(self.diagnostics.summary(runtime))
        return values


class DMCObjective(LMObjective):
    """The DMC retrofit (spec §4-§5) with the recipe levers of :class:`TrainConfig`."""

    name = "dmc"
    dmc = True
    label = "retrofit"

    def __init__(self, cfg: TrainConfig, teacher: Teacher | None = None) -> None:
        super().__init__(cfg, teacher)
        self.log_multiplier = 0.0  # dual ascent: CR-loss weight = cr_loss_weight · exp(this)

    def noise(self, seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
        return noise_generator(seed, step, rank, micro, device)

    def on_stage_end(self, model, stage: str) -> None:
        if stage == "zero-out":
            zero_decision_channels(model)  # end of stage 1: rows exactly 0

    def mode(self, pos) -> StepMode:
        cfg = self.cfg
        if pos.name == "zero-out":
            return StepMode(pos.name, channel_scale=core.zero_out_scale(pos.step, pos.length))
        if pos.name == "retrofit":
            return StepMode(pos.name, target_cr=core.cr_schedule(pos.step, cfg.target_cr, pos.length))
        if pos.name == "finetune":
            return StepMode(pos.name, target_cr=cfg.target_cr,
                            noise_scale=core.linear_anneal(pos.step, pos.length, 1.0, cfg.noise_end))
        return StepMode(pos.name, target_cr=cfg.target_cr, noise_scale=0.0, hard=True)  # "hard"

    def apply_mode(self, model, mode: StepMode) -> None:
        if mode.channel_scale is not None:
            model.set_dmc_mode(vanilla=True, channel_scale=mode.channel_scale)
        else:
            model.set_dmc_mode(vanilla=False)

    @property
    def cr_weight(self) -> float:
        return self.cfg.cr_loss_weight * math.exp(self.log_multiplier)

    def forward(self, model, batch, mode: StepMode, generator):
        kwargs = {}
        if mode.stage != "eval":
            kwargs = dict(dmc_target_cr=mode.target_cr, dmc_generator=generator, dmc_noise_scale=mode.noise_scale,
                          dmc_hard=mode.hard, dmc_two_sided=self._two_sided(mode))
        out = model(batch.input_ids, labels=batch.labels, document_ids=batch.document_ids,
                    position_ids=batch.position_ids, use_cache=False, **kwargs)
        return out, out.lm_loss

    def loss(self, model, batch, mode: StepMode, generator):
        loss, out, parts = super().loss(model, batch, mode, generator)
        if mode.target_cr is None:  # zero-out: plain attention, no decisions
            return loss, out, parts
        cr_loss = out.compression_loss  # two-sided at a fixed target if so configured (forward)
        loss = loss + self.cr_weight * cr_loss
        parts["cr_loss"] = cr_loss.detach()
        if self.cfg.max_head_cr is not None:
            ceiling = core.head_ceiling_loss(out.decisions, self.cfg.max_head_cr, getattr(out, "valid", None))
            # Relative to the CR loss's current weight: per (head, token) both losses have the same
            # gradient scale, so at weight > 1 a head over the ceiling is pushed down however large
            # the dual multiplier has grown (a fixed weight is outvoted by a grown multiplier).
            loss = loss + self.cfg.head_ceiling_weight * self.cr_weight * ceiling
            parts["head_ceiling_loss"] = ceiling.detach()
        return loss, out, parts

    def _two_sided(self, mode: StepMode) -> bool:
        """At a fixed target (fine-tune, hard), hold it rather than overshoot it (``cr_two_sided``)."""
        return bool(self.cfg.cr_two_sided) and mode.stage in ("finetune", "hard")

    def step_sums(self, out, mode: StepMode) -> dict[str, torch.Tensor]:
        if mode.target_cr is None:  # zero-out: no decisions
            return {}
        hard = out.decisions.detach().double()  # [B, layers, H, L]
        return {"merges": hard.sum(), "decisions": torch.tensor(float(hard.numel()), dtype=torch.float64,
                                                                   device=hard.device),
                "layer_merges": hard.sum(dim=(0, 2, 3))}

    def step_values(self, mode: StepMode, sums: dict[str, torch.Tensor], seq_len: int) -> dict:
        values = {"cr_loss": 0.0} if mode.target_cr is None else {}  # zero-out: logged as 0, not left out
        values["target_cr"] = mode.target_cr if mode.target_cr is not None else 1.0
        achieved = None
        if "merges" in sums:
            per_layer = sums["layer_merges"] / (sums["decisions"] / sums["layer_merges"].numel())
            # The training estimate over a row of seq_len tokens, its last merge_delay kept raw.
            delay = self.cfg.merge_delay
            achieved = float(core.delayed_cr(float(sums["merges"] / sums["decisions"]), seq_len, delay))
            values["per_layer_cr"] = [round(float(core.delayed_cr(float(a), seq_len, delay)), 4) for a in per_layer]
        values["achieved_cr"] = achieved if achieved is not None else 1.0
        values["cr_weight"] = self.cr_weight
        values["noise_scale"] = mode.noise_scale
        values["channel_scale"] = mode.channel_scale
        return values

    def evaluation(self, model, device: torch.device) -> DMCEvaluation:
        return DMCEvaluation(self, model, device)

    def summary(self, values: dict) -> str:
        if not values:
            return ""
        text = format_summary(values, self.cfg.target_cr)
        if values.get("val_cr") and abs(values["val_cr"] / self.cfg.target_cr - 1) > 0.05:
            text += (f"\nwarning: the realized CR {values['val_cr']:.2f} is more than 5% from the target "
                     f"{self.cfg.target_cr:g}")
        return text

    def after_step(self, mode: StepMode, achieved_cr: float | None) -> dict:
        """Dual ascent on the CR constraint (``cr_constraint="dual"``), once per global step."""
        if self.cfg.cr_constraint != "dual" or mode.target_cr is None or achieved_cr is None:
            return {}
        # With the two-sided loss at a fixed target, overshooting is a violation too.
        achieved = achieved_cr
        if self.cfg.cr_two_sided and mode.stage in ("finetune", "hard") and achieved_cr > mode.target_cr:
            achieved = 2 * mode.target_cr - achieved_cr
        self.log_multiplier = core.cr_multiplier_update(self.log_multiplier, mode.target_cr, achieved,
                                                        self.cfg.cr_dual_rate, math.log(self.cfg.cr_dual_max))
        return {"cr_loss_weight": self.cr_weight}

    def state_dict(self) -> dict:
        return {"cr_log_multiplier": self.log_multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.log_multiplier = float(state.get("cr_log_multiplier", 0.0))


def make_objective(cfg: TrainConfig, teacher: Teacher | None = None) -> LMObjective:
    return DMCObjective(cfg, teacher) if cfg.method == "dmc" else LMObjective(cfg, teacher)
