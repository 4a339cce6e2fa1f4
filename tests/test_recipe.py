"""The retrofit recipe's levers: their math, their schedules, and that each one keeps
the inference semantics of spec §2-§3 (the logit scale folds away; the hard stage *is* inference)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, dmc_model

from dmc import core
from dmc.hf.convert import fold_logit_scale, set_logit_scale
from dmc.train import TrainConfig
from dmc.train.diagnostics import HeadDiagnostics, cr_histogram, format_summary
from dmc.train.distributed import Runtime
from dmc.train.objectives import DMCObjective, distillation_loss, next_token_mask
from dmc.train.trainer import StagePosition, learning_rate


def _ids(batch=2, length=32, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ logit scale
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logit_scale_is_a_reparametrisation_that_folds_away(family):
    model = dmc_model(family)
    ids = _ids()
    with torch.no_grad():
        before = model(ids, use_cache=False)
        set_logit_scale(model, 10.0)
        assert model.config.dmc["logit_scale"] == 10.0
        assert all(layer.self_attn.dmc.logit_scale == 10.0 for layer in model.model.layers)
        scaled = model(ids, use_cache=False)
        fold_logit_scale(model)
        folded = model(ids, use_cache=False)
    assert model.config.dmc["logit_scale"] == 1.0
    assert before.decisions.sum() > 0  # merges happen
    for out in (scaled, folded):
        assert torch.equal(out.decisions, before.decisions)
        torch.testing.assert_close(out.decision_logits, before.decision_logits, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.logits, before.logits, rtol=1e-5, atol=1e-5)


def test_logit_scale_multiplies_the_decision_rows_gradient_step():
    """With s, the same weight change moves the logit s times as far: a = s·k[D-1] - c."""
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    _, _, a1, w1 = core.split_decision_channel(q, k, 5.0)
    _, _, a10, w10 = core.split_decision_channel(q, k, 5.0, logit_scale=10.0)
    torch.testing.assert_close(a10 + 5.0, 10.0 * (a1 + 5.0))
    torch.testing.assert_close(w10, w1)  # the importance is not scaled


# ------------------------------------------------------------------------------ hard stage, noise
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hard_training_forward_is_the_inference_forward(family):
    model = dmc_model(family, target_cr=4.0)
    ids = _ids()
    with torch.no_grad():
        reference = model.eval()(ids, labels=ids, use_cache=False)
    model.train()
    out = model(ids, labels=ids, dmc_hard=True, dmc_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.decisions.detach(), reference.decisions)
    torch.testing.assert_close(out.lm_loss, reference.lm_loss)
    # the decisions still learn: straight-through gradients reach the decision rows
    (out.lm_loss + out.compression_loss).backward()
    attn = model.model.layers[0].self_attn
    rows = attn.k_proj.weight.grad.view(-1, attn.head_dim, attn.k_proj.weight.shape[-1])[:, -1]
    assert rows.abs().sum() > 0


def test_noise_scale_zero_is_deterministic_and_one_is_the_paper():
    model = dmc_model("llama", target_cr=4.0).train()
    ids = _ids()
    run = lambda seed, scale: model(ids, labels=ids, dmc_noise_scale=scale,
                                    dmc_generator=torch.Generator().manual_seed(seed)).loss
    assert torch.equal(run(1, 0.0), run(2, 0.0))
    assert not torch.equal(run(1, 1.0), run(2, 1.0))
    assert torch.equal(run(1, 1.0), model(ids, labels=ids, dmc_generator=torch.Generator().manual_seed(1)).loss)
    assert not torch.equal(run(1, 0.5), run(1, 1.0))


# ------------------------------------------------------------------------------ losses
def test_distillation_loss_is_the_kl_of_the_masked_positions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    assert distillation_loss(teacher, teacher, mask) == pytest.approx(0.0, abs=1e-6)
    expected = F.kl_div(F.log_softmax(student[mask], -1), F.log_softmax(teacher[mask], -1), log_target=True,
                        reduction="batchmean")
    torch.testing.assert_close(distillation_loss(student, teacher, mask), expected)
    reverse = F.kl_div(F.log_softmax(teacher[mask], -1), F.log_softmax(student[mask], -1), log_target=True,
                       reduction="batchmean")
    torch.testing.assert_close(distillation_loss(student, teacher, mask, direction="reverse"), reverse)
    soft = F.kl_div(F.log_softmax(student[mask] / 2, -1), F.log_softmax(teacher[mask] / 2, -1), log_target=True,
                    reduction="batchmean") * 4
    torch.testing.assert_close(distillation_loss(student, teacher, mask, temperature=2.0), soft)
    with pytest.raises(ValueError, match="forward' or 'reverse"):
        distillation_loss(student, teacher, mask, direction="sideways")


def test_next_token_mask_follows_the_label_shift():
    labels = torch.tensor([[-100, 5, 6, -100, 7]])
    assert next_token_mask(labels).tolist() == [[True, True, False, True, False]]


def test_head_ceiling_loss_penalises_only_heads_over_the_cap():
    alpha = torch.zeros(2, 3, 2, 10)  # [B, layers, H, L]
    alpha[:, 0, 0, 1:] = 1.0  # one head merges 90%: CR 10
    alpha[:, 1, 1, ::2] = 1.0  # one at 50%: CR 2
    alpha.requires_grad_(True)
    loss = core.head_ceiling_loss(alpha, max_head_cr=4.0)
    assert float(loss.detach()) == pytest.approx((0.9 - 0.75) / 6)  # only the CR-10 head, mean over 6 heads
    loss.backward()
    assert alpha.grad[:, 0, 0].abs().sum() > 0 and alpha.grad[:, 1, 1].abs().sum() == 0
    assert float(core.head_ceiling_loss(alpha.detach(), max_head_cr=20.0)) == 0.0


def test_head_ceiling_scales_with_the_dual_multiplier():
    """A head over the ceiling is pushed down even when a grown multiplier pushes every head up."""
    from types import SimpleNamespace
    alpha = torch.zeros(1, 1, 2, 10)
    alpha[:, 0, 0, 1:] = 1.0  # head 0: CR 10, over a ceiling of 4; head 1 keeps every token
    alpha.requires_grad_(True)
    cfg = TrainConfig(target_cr=4.0, max_head_cr=4.0, head_ceiling_weight=2.0, distill_weight=0)
    objective = DMCObjective(cfg)
    objective.forward = lambda *args: (SimpleNamespace(compression_loss=core.compression_loss(alpha, 4.0),
                                                       decisions=alpha), torch.zeros((), requires_grad=True))
    mode = objective.mode(StagePosition("retrofit", 99, 100))
    for log_multiplier in (0.0, math.log(1e4)):
        objective.log_multiplier = log_multiplier
        alpha.grad = None
        loss, _, parts = objective.loss(None, None, mode, None)
        loss.backward()
        assert float(parts["head_ceiling_loss"]) > 0
        assert float(alpha.grad[0, 0, 0].sum()) > 0  # descent lowers the over-ceiling head's merges
        assert float(alpha.grad[0, 0, 1].sum()) < 0  # and raises the other's


def test_dual_ascent_multiplier_grows_while_behind_and_is_clipped():
    log_w = 0.0
    for _ in range(5):
        log_w = core.cr_multiplier_update(log_w, target_cr=4.0, achieved_cr=3.0, rate=2.0, max_log=math.log(100))
    assert log_w == pytest.approx(5 * 2.0 * 0.25)
    assert core.cr_multiplier_update(log_w, 4.0, 8.0, rate=2.0, max_log=10.0) == pytest.approx(log_w - 2.0)
    assert core.cr_multiplier_update(0.1, 4.0, 8.0, rate=2.0, max_log=10.0) == 0.0  # never below the base
    assert core.cr_multiplier_update(4.5, 4.0, 1.0, rate=10.0, max_log=math.log(100)) == pytest.approx(math.log(100))


# ------------------------------------------------------------------------------ schedules
def test_stage_modes_of_the_recipe():
    cfg = TrainConfig(target_cr=4.0, zero_out_steps=10, retrofit_steps=100, finetune_steps=40, hard_steps=8)
    objective = DMCObjective(cfg)
    assert cfg.stage_steps() == [("zero-out", 10), ("retrofit", 100), ("finetune", 40), ("hard", 8)]
    zero = objective.mode(StagePosition("zero-out", 4, 10))
    assert zero.target_cr is None and zero.channel_scale == pytest.approx(core.zero_out_scale(4, 10))
    assert objective.mode(StagePosition("retrofit", 50, 100)).target_cr == pytest.approx(2.5)
    assert objective.mode(StagePosition("finetune", 0, 40)).noise_scale == 1.0
    assert objective.mode(StagePosition("finetune", 39, 40)).noise_scale == 0.0  # noise_end
    assert objective.mode(StagePosition("finetune", 20, 40)).noise_scale == pytest.approx(1 - 20 / 39)
    hard = objective.mode(StagePosition("hard", 3, 8))
    assert hard.hard and hard.noise_scale == 0.0 and hard.target_cr == 4.0


def test_one_cosine_spans_the_finetune_and_the_hard_stage():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, finetune_steps=30, hard_steps=10)
    values = [learning_rate(cfg, StagePosition("finetune", i, 30)) for i in range(30)]
    values += [learning_rate(cfg, StagePosition("hard", i, 10)) for i in range(10)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))  # no restart at the hard stage


def test_paper_preset_and_explicit_settings():
    paper = TrainConfig(preset="paper")
    assert (paper.logit_scale, paper.cr_constraint, paper.distillation_weight, paper.noise_end) == (1.0, "hinge", 0.0, 1.0)
    assert [s for s, _ in paper.stage_steps()] == ["zero-out", "retrofit", "finetune"]
    mixed = TrainConfig(preset="paper", cr_constraint="dual", distill_weight=0.5)
    assert mixed.cr_constraint == "dual" and mixed.distillation_weight == 0.5 and mixed.logit_scale == 1.0
    default = TrainConfig()
    assert default.distillation_weight == 1.0 and TrainConfig(method="plain").distillation_weight == 0.0
    assert default.hard_total_steps == default.finetune_steps // 4
    from dmc.train import ConfigError
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainConfig(preset="fast")
    for bad in ({"logit_scale": 0}, {"cr_constraint": "soft"}, {"noise_end": 2}, {"distill_direction": "up"},
                {"distill_weight": 0, "lm_weight": 0}, {"max_head_cr": 1.0}, {"hard_steps": -1},
                {"on_bad_file": "maybe"}):
        with pytest.raises(ConfigError):
            TrainConfig(model="m", data=["d"], out="o", **bad).validate()


def test_two_sided_compression_loss_holds_the_target():
    alpha = torch.zeros(2, 1, 1, 10)
    alpha[0, ..., 1:9] = 1.0  # merge rate 0.8 (CR 5); the other row 0 (CR 1)
    assert float(core.compression_loss(alpha, 4.0)) == pytest.approx(0.75 / 2)  # only the short row
    assert float(core.compression_loss(alpha, 4.0, two_sided=True)) == pytest.approx((0.05 + 0.75) / 2)
    objective = DMCObjective(TrainConfig(cr_dual_rate=2.0))
    objective.after_step(objective.mode(StagePosition("finetune", 3, 10)), achieved_cr=5.0)  # overshoot
    assert objective.log_multiplier > 0
    paper = DMCObjective(TrainConfig(preset="paper"))
    assert paper.cfg.cr_two_sided is False


def test_dual_objective_state_round_trips():
    objective = DMCObjective(TrainConfig(cr_constraint="dual", cr_dual_rate=2.0))
    mode = objective.mode(StagePosition("retrofit", 50, 100))
    logged = objective.after_step(mode, achieved_cr=1.5)
    assert objective.log_multiplier > 0 and logged["cr_loss_weight"] == pytest.approx(objective.cr_weight)
    other = DMCObjective(TrainConfig())
    other.load_state_dict(objective.state_dict())
    assert other.cr_weight == objective.cr_weight
    hinge = DMCObjective(TrainConfig(cr_constraint="hinge"))
    assert hinge.after_step(mode, achieved_cr=1.5) == {} and hinge.cr_weight == 1.0


# ------------------------------------------------------------------------------ diagnostics
def test_head_diagnostics_from_an_eval_forward():
    model = dmc_model("llama")
    with torch.no_grad():
        out = model(_ids(), use_cache=False)
    diagnostics = HeadDiagnostics()
    diagnostics.add(out)
    diagnostics.add(out)
    values = diagnostics.summary(Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert len(values["head_cr"]) == heads and sum(values["head_cr_hist"].values()) == heads
    torch.testing.assert_close(torch.tensor(values["head_cr"]), out.compression.per_head_cr.flatten().float(),
                               rtol=1e-3, atol=1e-3)
    logits = out.decision_logits  # [B, layers, H, L]
    torch.testing.assert_close(torch.tensor(values["logit_mean"]), logits.mean((0, 3)).flatten(), rtol=1e-3, atol=1e-3)
    assert values["logit_near_threshold"] == pytest.approx(float((logits.abs() < 1).float().mean()))
    text = format_summary({"val_cr": 2.0, "val_loss": 1.0, "val_loss_relaxed": 0.99, "relaxation_gap": 0.01,
                           **values}, 2.0)
    assert "target CR 2" in text and "relaxed-vs-hard loss gap +0.0100" in text


def test_cr_histogram_bins():
    hist = cr_histogram([1.0, 1.1, 3.9, 4.0, 100.0])
    assert hist["1-1.25"] == 2 and hist["3-4"] == 1 and hist["4-6"] == 1 and hist[">=64"] == 1
    assert sum(hist.values()) == 5


def test_per_head_diagnostics_reach_tensorboard_as_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmc.train.metrics import MetricsLogger
    logger = MetricsLogger(tmp_path, True, True, False, "dmc", {}, None)
    logger.log(5, {"val_cr": 2.0, "head_cr": [1.0, 2.0, 4.0, 8.0], "logit_mean": [-1.0, 0.5, 1.0, 2.0],
                   "head_cr_hist": {"1-1.25": 1}})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"head_cr", "logit_mean"} <= set(events.Tags()["histograms"])
    assert "head_cr/3" in events.Tags()["scalars"] and "val_cr" in events.Tags()["scalars"]
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["head_cr_hist"] == {"1-1.25": 1}
