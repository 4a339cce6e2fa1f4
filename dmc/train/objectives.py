"""What a training step optimises: one object per method, so the trainer has a single loop.

- :class:`LMObjective` (``method="plain"``): next-token cross-entropy of a stock model (continued
  training, GQA up-training), optionally plus distillation.
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
from .config import TrainConfig


@dataclass
class StepMode:
    """How one global step runs (a pure function of the step: resumes are exact)."""

    stage: str
    target_cr: float | None = None  # None: no compression loss (zero-out, plain)
    noise_scale: float = 1.0
    hard: bool = False
    channel_scale: float | None = None  # zero-out: μ(s), plain attention


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


class LMObjective:
    """Continued training of a stock model on the LM loss (plus distillation if a teacher is set)."""

    name = "plain"
    dmc = False

    def __init__(self, cfg: TrainConfig, teacher: Teacher | None = None) -> None:
        self.cfg, self.teacher = cfg, teacher

    def mode(self, pos) -> StepMode:
        return StepMode(pos.name)

    def apply_mode(self, model, mode: StepMode) -> None:
        pass

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

    def eval_forward(self, model, batch):
        return self.forward(model, batch, StepMode("eval"), None)

    # state carried across steps (checkpointed)
    def after_step(self, mode: StepMode, achieved_cr: float | None) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DMCObjective(LMObjective):
    """The DMC retrofit (spec §4-§5) with the recipe levers of :class:`TrainConfig`."""

    name = "dmc"
    dmc = True

    def __init__(self, cfg: TrainConfig, teacher: Teacher | None = None) -> None:
        super().__init__(cfg, teacher)
        self.log_multiplier = 0.0  # dual ascent: CR-loss weight = cr_loss_weight · exp(this)

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
                          dmc_hard=mode.hard)
        out = model(batch.input_ids, labels=batch.labels, document_ids=batch.document_ids,
                    position_ids=batch.position_ids, use_cache=False, **kwargs)
        return out, out.lm_loss

    def loss(self, model, batch, mode: StepMode, generator):
        loss, out, parts = super().loss(model, batch, mode, generator)
        if mode.target_cr is None:  # zero-out: plain attention, no decisions
            return loss, out, parts
        cr_loss = out.compression_loss
        if self.cfg.cr_two_sided and mode.stage in ("finetune", "hard"):  # hold the target, don't overshoot it
            cr_loss = core.compression_loss(out.decisions, mode.target_cr, getattr(out, "valid", None), two_sided=True,
                                             merge_delay=self.cfg.merge_delay)
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
