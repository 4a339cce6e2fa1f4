"""The retrofit trainer: zero-out → retrofit → fine-tune (spec §5), one GPU to many.

With ``method="plain"`` the same loop continues training a stock model on the LM loss alone (the
GQA up-training baseline, spec §8): same plan, data, optimiser, checkpoints; nothing converted.

A straight loop over global steps. Everything random or scheduled is a function of the step
(CR(s), μ(s), lr, the data rows, the Gumbel noise seeded by (seed, step, rank, micro-step)), so
a run resumed from a checkpoint computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import resource
import shutil
import time
from dataclasses import dataclass

import torch

from .. import core
from ..config import DMCConfig
from ..hf.convert import UnsupportedModelError, convert, supported_architectures, zero_decision_channels
from ..hf.modeling import FAMILIES, compile_decoder_layers
from .checkpoint import Checkpointer
from .config import ConfigError, TrainConfig
from .data import PackedData
from .distributed import Runtime, all_reduce_sum, barrier, init_runtime, shard_model
from .metrics import MetricsLogger

RUN_FILE = "run.json"


@dataclass
class StagePosition:
    name: str
    step: int  # step inside the stage
    length: int


def locate(plan: list[tuple[str, int]], global_step: int) -> StagePosition:
    """Which stage a global step falls in, and where inside it."""
    offset = 0
    for name, length in plan:
        if global_step < offset + length:
            return StagePosition(name, global_step - offset, length)
        offset += length
    raise IndexError(global_step)


def learning_rate(cfg: TrainConfig, pos: StagePosition) -> float:
    """Linear warmup at the start of each stage, then constant (zero-out, retrofit) or cosine
    from lr to min_lr (fine-tune)."""
    if cfg.warmup_steps and pos.step < cfg.warmup_steps:
        return cfg.lr * (pos.step + 1) / cfg.warmup_steps
    if pos.name != "finetune":
        return cfg.lr
    span = max(1, pos.length - cfg.warmup_steps - 1)
    progress = min(1.0, (pos.step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def noise_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The Gumbel noise of one micro-step: a function of (seed, step, rank, micro-step)."""
    mixed = (seed * 1_000_003 + step) * 1_009 + rank * 101 + micro
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


def _dmc_model_type(model_type: str) -> bool:
    return any(f.dmc_config_class.model_type == model_type for f in FAMILIES)


class Retrofitter:
    """Runs the stages of ``cfg`` and writes a ``save_pretrained`` DMC model to ``cfg.out`` (a stock
    model with ``method="plain"``)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.plain = cfg.method == "plain"
        self.rt = runtime or init_runtime()
        self.out = pathlib.Path(cfg.out)
        self.run_dir = self.out / "run"
        self.plan = cfg.stage_steps()
        self.total_steps = sum(length for _, length in self.plan)
        self._check_output_dir()
        self.tokenizer, self.model = self._load_model()
        seq_len = min(cfg.seq_len, getattr(self.model.config, "max_position_embeddings", cfg.seq_len))
        self.data = PackedData.from_sources(cfg.data, self.tokenizer, seq_len, cfg.val_fraction, cfg.seed,
                                            cfg.text_field, cfg.token_cache, progress=self.rt.is_main)
        if self.data.val_rows < self.rt.world and self.rt.is_main:
            print(f"note: the held-out split ({self.data.val_rows} rows of {seq_len} tokens) is too small to "
                  f"evaluate on {self.rt.world} process(es); raise --val-fraction to get validation loss")
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.rt.device.type == "cuda"
        self._prepare_model()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.rt.device.type == "cuda")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.rt, cfg.keep_checkpoints)
        self.step = 0
        if cfg.resume:
            self._resume()
        self.metrics = MetricsLogger(self.run_dir, self.rt.is_main, cfg.tensorboard, cfg.wandb, cfg.wandb_project,
                                     cfg.to_dict(), self.step if cfg.resume else None)

    # ------------------------------------------------------------------------------ setup
    def _check_output_dir(self) -> None:
        cfg = self.cfg
        run_file = self.run_dir / RUN_FILE
        identity = cfg.training_identity()
        if cfg.overwrite and self.rt.is_main and self.out.exists():
            shutil.rmtree(self.out)
        barrier(self.rt)
        if (self.out / "config.json").exists() and not cfg.resume:
            raise ConfigError(f"{self.out} already holds a finished model; choose another --out or pass --overwrite")
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            previous.setdefault("method", "dmc")  # runs started before TrainConfig.method existed
            if previous != json.loads(json.dumps(identity)):
                changed = sorted(k for k in identity if previous.get(k) != json.loads(json.dumps(identity)).get(k))
                raise ConfigError(f"{self.out} holds a different run (settings differ: {', '.join(changed)}); "
                                  "choose another --out or pass --overwrite to discard it")
            if not cfg.resume:
                raise ConfigError(f"{self.out} holds an unfinished run with these settings; pass --resume to "
                                  "continue it or --overwrite to start again")
        elif cfg.resume:
            raise ConfigError(f"nothing to resume in {self.out}: no run was started there")
        elif self.out.exists() and any(self.out.iterdir()):
            raise ConfigError(f"{self.out} exists and is not a dmc run directory; choose an empty or new --out")
        barrier(self.rt)  # every rank has checked before rank 0 writes
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps(identity, indent=1))
        barrier(self.rt)

    def _load_model(self):
        import transformers
        cfg = self.cfg
        path = pathlib.Path(cfg.model)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{cfg.model} is not a Hugging Face model directory (no config.json); pass the "
                              "directory that save_pretrained wrote")
        base_config = transformers.AutoConfig.from_pretrained(path)
        supported = [f.model_type for f in FAMILIES]
        if base_config.model_type not in supported and not _dmc_model_type(base_config.model_type):
            raise ConfigError(f"{cfg.model} holds a {base_config.model_type!r} model; DMC supports "
                              f"{', '.join(supported_architectures())}")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any loading failure gets the same advice
            raise ConfigError(f"could not load the tokenizer of {cfg.model} ({e}); save it beside the model "
                              "with tokenizer.save_pretrained(DIR)") from e
        if self.plain:
            if _dmc_model_type(base_config.model_type):
                raise ConfigError(f"{cfg.model} holds a DMC model; --method plain trains stock models (e.g. the "
                                  "output of `dmc gqa`): pass one, or use --method dmc")
            # Stock attention: HF masks packed documents apart from the per-document position_ids.
            attn = {"flex": "flex_attention"}.get(cfg.attn_implementation)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, **({"attn_implementation": attn} if attn else {}))
            return tokenizer, model
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        settings = DMCConfig(window=cfg.window, init_offset=cfg.init_offset, temperature=cfg.temperature,
                             target_cr=cfg.target_cr, attn_implementation=cfg.attn_implementation)
        if _dmc_model_type(base_config.model_type):
            model.config.dmc = settings.to_dict()
            for layer in model.model.layers:
                layer.self_attn.dmc = settings
        else:
            try:
                model = convert(model, settings)
            except UnsupportedModelError as e:
                raise ConfigError(str(e)) from e
            if "zero-out" not in cfg.stages:
                import warnings
                warnings.warn("the model is not a DMC model and the zero-out stage is skipped: zeroing the "
                              "decision channels at once (run zero-out for a gentler start)", stacklevel=2)
                zero_decision_channels(model)
        return tokenizer, model

    def _prepare_model(self) -> None:
        model = self.model.to(self.rt.device)
        if self.cfg.activation_checkpointing:
            model.activation_checkpointing_enable()
        if self.cfg.compile:
            compile_decoder_layers(model)
        if self.rt.distributed:
            model = shard_model(model, self.rt, self.bf16)
        self.model = model.train()

    def _resume(self) -> None:
        latest = self.checkpointer.latest()
        if latest is None:
            if self.rt.is_main:
                print(f"no complete checkpoint in {self.run_dir}; starting from step 0")
            return
        state = self.checkpointer.load(self.model, self.optimizer, latest)
        self.step = state["step"]
        if state.get("rows_per_step") != self.rows_per_step:
            raise ConfigError("the checkpoint was written with another global batch; resume with the same "
                              "micro_batch_size, grad_accum and number of processes")
        if self.rt.is_main:
            print(f"resuming from {latest.name} (step {self.step}/{self.total_steps})")

    # ------------------------------------------------------------------------------ training
    @property
    def rows_per_step(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.rt.world

    def _rows(self, micro: int) -> list[int]:
        mbs = self.cfg.micro_batch_size
        first = ((self.step * self.cfg.grad_accum + micro) * self.rt.world + self.rt.rank) * mbs
        return list(range(first, first + mbs))

    def _autocast(self):
        if self.bf16 and not self.rt.distributed:
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_stage_mode(self, pos: StagePosition) -> float | None:
        """Model mode and target CR of a step."""
        if self.plain:
            return None
        if pos.name == "zero-out":
            self.model.set_dmc_mode(vanilla=True, channel_scale=core.zero_out_scale(pos.step, pos.length))
            return None
        self.model.set_dmc_mode(vanilla=False)
        if pos.name == "retrofit":
            return core.cr_schedule(pos.step, self.cfg.target_cr, pos.length)
        return self.cfg.target_cr

    def _forward(self, batch, **dmc_kwargs):
        """(output, LM loss) of one batch. A stock model (``method="plain"``) gets no DMC inputs."""
        with self._autocast():
            if self.plain:
                out = self.model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                                 use_cache=False)
                return out, out.loss
            out = self.model(batch.input_ids, labels=batch.labels, document_ids=batch.document_ids,
                             position_ids=batch.position_ids, use_cache=False, **dmc_kwargs)
            return out, out.lm_loss

    def train_step(self, pos: StagePosition) -> dict:
        cfg = self.cfg
        target_cr = self._set_stage_mode(pos)
        lr = learning_rate(cfg, pos)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        zero = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        totals = torch.zeros(5, dtype=torch.float64, device=self.rt.device)  # lm, cr, merges, decisions, n
        per_layer = None
        for micro in range(cfg.grad_accum):
            batch = self.data.train_rows(self._rows(micro)).to(self.rt.device)
            if self.plain:
                out, lm_loss = self._forward(batch)
                cr_loss = None
            else:
                gen = noise_generator(cfg.seed, self.step, self.rt.rank, micro, self.rt.device)
                out, lm_loss = self._forward(batch, dmc_target_cr=target_cr, dmc_generator=gen)
                cr_loss = out.compression_loss
            loss = lm_loss + (cfg.cr_loss_weight * cr_loss if cr_loss is not None else 0.0)
            (loss / cfg.grad_accum).backward()
            merges = decisions = zero
            if not self.plain:
                hard = out.decisions.detach().double()  # [B, layers, H, L]
                layer_merges = hard.sum(dim=(0, 2, 3))
                per_layer = layer_merges if per_layer is None else per_layer + layer_merges
                merges, decisions = hard.sum(), torch.tensor(hard.numel(), dtype=torch.float64,
                                                             device=self.rt.device)
            totals += torch.stack([lm_loss.detach().double(),
                                   cr_loss.detach().double() if cr_loss is not None else zero,
                                   merges, decisions, torch.ones((), dtype=torch.float64, device=self.rt.device)])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = all_reduce_sum(totals, self.rt)
        values = {"stage": pos.name, "lm_loss": float(totals[0] / totals[4])}
        if not self.plain:  # compression numbers exist only for DMC
            per_layer = all_reduce_sum(per_layer, self.rt) / (totals[3] / per_layer.numel())
            mean_alpha = float(totals[2] / totals[3])
            values.update({
                "cr_loss": float(totals[1] / totals[4]),
                "target_cr": target_cr if target_cr is not None else 1.0,
                "achieved_cr": float(core.cr_from_alpha(mean_alpha)),
                "per_layer_cr": [round(float(core.cr_from_alpha(float(a))), 4) for a in per_layer],
            })
        values.update({
            "lr": lr,
            "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
        })
        if not self.plain:
            values["channel_scale"] = self.model.model.dmc_channel_scale if pos.name == "zero-out" else None
        return values

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out LM loss and realized CR with hard decisions (full-sequence mode)."""
        # Compiled layers evaluate eagerly: an eval graph costs another long compile for a few
        # batches, and torch 2.11's inductor failed lowering DMC's eval-mode FlexAttention.
        stance = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
        with stance:
            return self._evaluate()

    def _evaluate(self) -> dict:
        # DMC runs also measure the same batches in training mode (relaxed decisions with noise from
        # a fixed seed): val_loss_relaxed - val_loss is what inference's hard decisions cost.
        relaxed = not self.plain and not self.model.model.dmc_vanilla
        generator = torch.Generator(self.rt.device).manual_seed(self.cfg.seed + 1) if relaxed else None
        sums = torch.zeros(5, dtype=torch.float64, device=self.rt.device)  # loss·n, n, tokens, slots, relaxed·n
        for batch in self.data.val_batches(self.cfg.micro_batch_size, self.cfg.eval_batches, self.rt.rank,
                                           self.rt.world):
            batch = batch.to(self.rt.device)
            self.model.eval()
            out, lm_loss = self._forward(batch)
            n = float((batch.labels[:, 1:] != -100).sum())
            tokens, slots = (0.0, 0.0) if self.plain else (float(out.compression.tokens.sum()),
                                                           float(out.compression.slots.sum()))
            relaxed_loss = 0.0
            if relaxed:
                self.model.train()
                relaxed_loss = float(self._forward(batch, dmc_generator=generator)[1])
            sums += torch.tensor([float(lm_loss) * n, n, tokens, slots, relaxed_loss * n], dtype=torch.float64,
                                 device=self.rt.device)
        sums = all_reduce_sum(sums, self.rt)
        self.model.train()
        if sums[1] == 0:
            return {}
        values = {"val_loss": float(sums[0] / sums[1]), "val_ppl": math.exp(min(50.0, float(sums[0] / sums[1])))}
        if not self.plain:
            values["val_cr"] = float(sums[2] / sums[3])
        if relaxed:
            values["val_loss_relaxed"] = float(sums[4] / sums[1])
        return values

    def _state(self) -> dict:
        return {"step": self.step, "rows_consumed": self.step * self.rows_per_step,
                "rows_per_step": self.rows_per_step, "total_steps": self.total_steps}

    def run(self) -> pathlib.Path | None:
        """Train to the end of the plan (or ``max_steps``); write the final model at the end."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        stop = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        tokens_per_step = self.rows_per_step * self.data.seq_len
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train (plain)" if self.plain else "retrofit",
                   unit="step",
                   disable=not (self.rt.is_main and cfg.progress), dynamic_ncols=True)
        while self.step < stop:
            pos = locate(self.plan, self.step)
            start = time.perf_counter()
            values = self.train_step(pos)
            if pos.name == "zero-out" and pos.step == pos.length - 1 and not self.plain:
                zero_decision_channels(self.model)  # end of stage 1: rows exactly 0
            elapsed = time.perf_counter() - start
            self.step += 1
            values["tokens_per_s"] = tokens_per_step / elapsed
            values["memory_gib"] = _memory_gib(self.rt.device)
            if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                values.update(self.evaluate())
            self.metrics.log(self.step, values)
            postfix = {"stage": pos.name, "loss": f"{values['lm_loss']:.3f}"}
            if not self.plain:
                postfix["cr"] = f"{values['achieved_cr']:.2f}/{values['target_cr']:.2f}"
            bar.set_postfix(**postfix, tok_s=f"{values['tokens_per_s']:.0f}")
            bar.update(1)
            stage_end = pos.step == pos.length - 1
            if self.step % cfg.save_every == 0 or stage_end or self.step == stop:
                self.checkpointer.save(self.model, self.optimizer, self._state())
        bar.close()
        self.metrics.close()
        if self.step < self.total_steps:
            if self.rt.is_main:
                print(f"stopped at step {self.step}/{self.total_steps}; continue with --resume")
            return None
        return self.save_final()

    # ------------------------------------------------------------------------------ output
    def save_final(self) -> pathlib.Path:
        """Write the DMC model (a stock one with ``method="plain"``) and tokenizer into ``cfg.out``
        (config.json last: a partly written directory is never loadable as a model)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rt.is_main:
            final = self._unsharded_copy(state)
            if not self.plain:
                final.config.dmc = {**final.config.dmc, "target_cr": self.cfg.target_cr}
            tmp = self.out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            final.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")
            for f in files:
                os.replace(f, self.out / f.name)
            tmp.rmdir()
        barrier(self.rt)
        return self.out

    def _unsharded_copy(self, state: dict) -> torch.nn.Module:
        if self.plain:
            family = next(f for f in FAMILIES if f.model_type == self.model.config.model_type)
            model = family.causal_lm_class(self.model.config)
        else:
            family = next(f for f in FAMILIES if isinstance(self.model, f.dmc_causal_lm_class))
            model = family.dmc_causal_lm_class(self.model.config)
        model.load_state_dict(state, strict=True)
        model.generation_config = self.model.generation_config
        return model.eval()


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def retrofit(model: str, data: str | list[str], out: str, target_cr: float, **settings) -> pathlib.Path | None:
    """Python API of ``dmc retrofit``: see :class:`~dmc.train.config.TrainConfig` for ``settings``
    (``method="plain"``: LM-only continued training of a stock model, e.g. GQA up-training).

    Returns the output directory holding the model, or None when stopped by ``max_steps``.
    """
    cfg = TrainConfig(model=model, data=data if isinstance(data, list) else [data], out=out, target_cr=target_cr,
                      **settings)
    return Retrofitter(cfg).run()
