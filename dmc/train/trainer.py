"""The retrofit trainer: zero-out → retrofit → fine-tune (spec §5), one GPU to many.

The project's one training loop, built from small parts: the run directory (:mod:`dmc.train.rundir`:
lock, identity, what ``--out`` holds), the model loaded and written per method (:mod:`dmc.train.models`),
the objective (:mod:`dmc.train.objectives`: a step's mode, loss, metrics and carried state), the data
(:mod:`dmc.train.data`) and the checkpoints (:mod:`dmc.train.checkpoint`). With ``method="plain"`` the
same loop continues training a stock model on the LM loss alone (the GQA up-training baseline, spec §8):
same plan, data, optimiser, checkpoints; nothing converted. Callbacks see every step's metrics
(logging, time budgets).

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
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import is_dmc
from ..hf.convert import fold_logit_scale, supported_architectures
from ..hf.modeling import FAMILIES, compile_decoder_layers
from ..errors import one_line
from .checkpoint import CheckpointException, Checkpointer, interrupts_deferred, unwrap_checkpoint_error
from .config import ConfigError, TrainConfig
from .data import PackedData
from .distributed import Runtime, all_reduce_sum, barrier, init_runtime, shard_model
from .metrics import MetricsLogger
from .models import load_model, prepare_for_saving, saved_class
from .objectives import LMObjective, Teacher, make_objective, noise_generator
from .rundir import RunDirectory, check_output_location

__all__ = ["Callback", "Retrofitter", "TrainingDiverged", "learning_rate", "locate", "noise_generator", "retrofit"]


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite: the run stopped without writing a model (the last good
    checkpoint stays); the message says what to do."""


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
    """Linear warmup at the start of each stage, then constant (zero-out, retrofit) or one cosine
    from lr to min_lr over the fine-tune and the hard stage after it (no warmup in between)."""
    finetune = cfg.finetune_steps if "finetune" in cfg.stages else 0
    hard = cfg.hard_total_steps if "hard" in cfg.stages else 0
    step = pos.step + (finetune if pos.name == "hard" else 0)
    if cfg.warmup_steps and step < cfg.warmup_steps and pos.name != "hard":
        return cfg.lr * (pos.step + 1) / cfg.warmup_steps
    if pos.name not in ("finetune", "hard"):
        return cfg.lr
    span = max(1, finetune + hard - cfg.warmup_steps - 1)
    progress = min(1.0, max(0.0, step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


Callback = Callable[["Retrofitter", int, dict], None]
"""Called on every rank after each step's metrics are logged, with the trainer, the global step
just done and its metrics (a time budget raises or sets ``trainer.stop_requested``)."""


class Retrofitter:
    """Runs the stages of ``cfg`` and writes a ``save_pretrained`` DMC model to ``cfg.out`` (a stock
    model with ``method="plain"``).

    ``objective`` (default: the one of ``cfg.method``, :func:`~dmc.train.objectives.make_objective`)
    decides everything method-specific; its teacher, if it has none, is loaded from ``cfg``.
    ``callbacks`` see every step's metrics (:data:`Callback`)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime | None = None, objective: LMObjective | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        cfg.validate()
        self.cfg = cfg
        self.objective = objective if objective is not None else make_objective(cfg)
        self.callbacks = list(callbacks)
        self.stop_requested = False
        self.rt = runtime or init_runtime()
        self.out = pathlib.Path(cfg.out).expanduser()
        self.run_dir = self.out / "run"
        self.plan = cfg.stage_steps()
        self.total_steps = sum(length for _, length in self.plan)
        self.directory = RunDirectory(self.out, self.rt, ConfigError)
        self.finished = False  # set when --resume finds the run's model written: only the data is loaded then
        self.checkpoints_note: str | None = None  # one line on the checkpoints a finished run kept
        try:
            self._check_output_dir()
            if self.finished:
                self._setup_finished()
                return
            self._setup()
        except BaseException:
            self.directory.abandon()
            raise

    def _setup(self) -> None:
        """Load model and data, build the optimizer, resume; only then write run.json (a start
        that fails leaves no run behind)."""
        cfg = self.cfg
        self.tokenizer, self.model = self._load_model()
        seq_len = min(cfg.seq_len, getattr(self.model.config, "max_position_embeddings", cfg.seq_len))
        cfg.check_merge_delay(seq_len, model_capped=seq_len < cfg.seq_len)
        self.seq_len = seq_len
        self._load_data(progress=self.rt.is_main)
        if self.data.val_rows < self.rt.world and self.rt.is_main:
            print(f"note: the held-out split ({self.data.val_rows} rows of {seq_len} tokens) is too small to "
                  f"evaluate on {self.rt.world} process(es); raise --val-fraction to get validation loss")
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.rt.device.type == "cuda"
        self._prepare_model()
        if self.objective.teacher is None:
            self.objective.teacher = self._load_teacher()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.rt.device.type == "cuda")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.rt, cfg.checkpoints_kept)
        self.step = 0
        if cfg.resume:
            self._resume()
        self.directory.record(cfg.training_identity(), cfg.resume)
        self.metrics = MetricsLogger(self.run_dir, self.rt.is_main, cfg.tensorboard, cfg.wandb, cfg.wandb_project,
                                     cfg.to_dict(), self.step if cfg.resume else None)

    def _setup_finished(self) -> None:
        """A finished run asked to resume: no model, no optimizer, nothing written; the tokenizer and the
        data (from the token cache) so that what a caller reads of a run (``data``, ``rows_per_step``) holds."""
        import transformers
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(pathlib.Path(self.cfg.model).expanduser())
        except Exception as e:  # noqa: BLE001 - any loading failure gets the same advice
            raise ConfigError(f"could not load the tokenizer of {self.cfg.model} ({one_line(e)}); save it beside "
                              "the model with tokenizer.save_pretrained(DIR)") from None
        self._load_data(progress=False)

    def _load_data(self, progress: bool) -> None:
        cfg = self.cfg
        self.data = PackedData.from_sources(cfg.data, self.tokenizer, self.seq_len, cfg.val_fraction, cfg.seed,
                                            cfg.text_field, cfg.token_cache, progress=progress,
                                            on_bad_file=cfg.on_bad_file)

    # ------------------------------------------------------------------------------ setup
    def _check_output_dir(self) -> None:
        """Refuse an --out that must not be written (or overwritten), take the run's lock, check
        what the directory holds (:class:`~dmc.train.rundir.RunDirectory`). Writes nothing but the
        lock: --overwrite removes the previous run only once model and data have loaded."""
        cfg = self.cfg
        model_dir = pathlib.Path(cfg.model).expanduser()
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{cfg.model} is not a Hugging Face model directory (no config.json); pass the "
                              "directory that save_pretrained wrote")
        check_output_location(cfg.out, cfg.model, cfg.data, ConfigError)
        state = self.directory.open(cfg.training_identity(), cfg.resume, cfg.overwrite)
        if state == RunDirectory.FINISHED:
            self.finished = True
            self.step = self.total_steps
            self.seq_len = self._capped_seq_len(model_dir)

    def _capped_seq_len(self, model_dir: pathlib.Path) -> int:
        """The training row length: ``seq_len`` capped at the model's max positions."""
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return self.cfg.seq_len
        return min(self.cfg.seq_len, config.get("max_position_embeddings") or self.cfg.seq_len)

    def _release(self) -> None:
        self.directory.release()

    def _load_model(self):
        import transformers
        cfg = self.cfg
        path = pathlib.Path(cfg.model).expanduser()  # holds a config.json (checked with the output directory)
        try:
            base_config = transformers.AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - broken JSON, unknown model type, ...
            raise ConfigError(f"cannot read {path / 'config.json'} ({one_line(e)}); copy the model directory "
                              "again or fix the file") from None
        supported = [f.model_type for f in FAMILIES]
        if base_config.model_type not in supported and not is_dmc(base_config.model_type):
            raise ConfigError(f"{cfg.model} holds a {base_config.model_type!r} model; DMC supports "
                              f"{', '.join(supported_architectures())}")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any loading failure gets the same advice
            raise ConfigError(f"could not load the tokenizer of {cfg.model} ({e}); save it beside the model "
                              "with tokenizer.save_pretrained(DIR)") from e
        return tokenizer, load_model(cfg, path, base_config.model_type)

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
        """Load the newest checkpoint that reads; an unreadable one (truncated, corrupt) is set aside
        as ``step_….unreadable`` and the one before it is used, with a warning."""
        candidates = self.checkpointer.complete()
        if not candidates:
            if self.rt.is_main:
                print(f"no complete checkpoint in {self.run_dir}; starting from step 0")
            return
        failures = []
        state = None
        for path in candidates:
            error = None
            try:
                saved = self.checkpointer.read_state(path)
            except (OSError, ValueError) as e:
                error = e
            else:
                if saved.get("rows_per_step") != self.rows_per_step:
                    raise ConfigError("the checkpoint was written with another global batch; resume with the same "
                                      "micro_batch_size, grad_accum and number of processes")
                try:
                    state = self.checkpointer.load(self.model, self.optimizer, path)
                except (MemoryError, KeyboardInterrupt):
                    raise
                except (Exception, CheckpointException) as e:  # noqa: BLE001 - fall back to the previous one
                    error = unwrap_checkpoint_error(e)
            if self._any_rank(error is not None):
                failures.append((path, error))
                state = None
                continue
            break
        if state is None:
            first = failures[0]
            raise ConfigError(f"no checkpoint in {self.checkpointer.root} can be read ({first[0].name}: "
                              f"{one_line(first[1]) if first[1] else 'unreadable on another rank'}); pass "
                              "--overwrite (without --resume) to start again")
        for bad, error in failures:
            moved = self.checkpointer.set_aside(bad)
            if self.rt.is_main:
                print(f"warning: checkpoint {bad.name} cannot be read ({one_line(error) if error else 'on another rank'}"
                      f"); set aside as {moved.name}, resuming from the one before it, {path.name}", file=sys.stderr)
        self.step = state["step"]
        self.objective.load_state_dict(state)
        if self.rt.is_main:
            print(f"resuming from {path.name} (step {self.step}/{self.total_steps})")

    def _any_rank(self, flag: bool) -> bool:
        if not self.rt.distributed:
            return flag
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self.rt.device), self.rt)[0] > 0)

    def _weights_finite(self) -> bool:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in local]).all()) if local else True
        return not self._any_rank(not finite)

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

    def _load_teacher(self) -> Teacher | None:
        """The frozen model distilled from (spec-free lever, TrainConfig.distill_*): by default the
        input model itself, i.e. the original weights with channel D-1 intact."""
        import transformers
        cfg = self.cfg
        if cfg.distillation_weight == 0:
            return None
        path = cfg.teacher or cfg.model
        config = transformers.AutoConfig.from_pretrained(path)
        if is_dmc(config.model_type):
            if cfg.teacher is None and cfg.distill_weight is None:
                if self.rt.is_main:
                    print(f"note: {cfg.model} is already a DMC model; no distillation (pass --teacher ORIGINAL_DIR)")
                return None
            raise ConfigError(f"the teacher {path} is a DMC model; pass the original model with --teacher")
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        teacher = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.rt.device)
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise ConfigError(f"the teacher {path} has another vocabulary ({teacher.config.vocab_size} vs "
                              f"{self.model.config.vocab_size} tokens); distillation needs the same tokenizer")
        return Teacher(teacher)

    def _autocast_forward(self, fn, *args):
        with self._autocast():
            return fn(*args)

    def train_step(self, pos: StagePosition) -> dict:
        cfg = self.cfg
        mode = self.objective.mode(pos)
        self.objective.apply_mode(self.model, mode)
        lr = learning_rate(cfg, pos)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        device = self.rt.device
        losses: dict[str, torch.Tensor] = {}  # the loss terms: logged as their mean over micro-steps
        sums: dict[str, torch.Tensor] = {}  # what the objective counts: handed back summed
        for micro in range(cfg.grad_accum):
            batch = self.data.train_rows(self._rows(micro)).to(device)
            gen = self.objective.noise(cfg.seed, self.step, self.rt.rank, micro, device)
            loss, out, parts = self._autocast_forward(self.objective.loss, self.model, batch, mode, gen)
            (loss / cfg.grad_accum).backward()
            _accumulate(losses, {key: value.double() for key, value in parts.items()})
            _accumulate(sums, self.objective.step_sums(out, mode))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        losses, sums = self._reduce(losses), self._reduce(sums)
        micro_steps = cfg.grad_accum * self.rt.world
        values = {"stage": pos.name, **{k: float(v / micro_steps) for k, v in sorted(losses.items())}}
        values.update(self.objective.step_values(mode, sums, self.seq_len))
        # The state carried across steps (the dual-ascent CR multiplier) moves once per global step, from
        # the CR all ranks achieved together.
        values.update(self.objective.after_step(mode, values.get("achieved_cr")))
        values.update({
            "lr": lr,
            "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
        })
        return values

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``sums`` summed over ranks, in one all-reduce (every rank has the same keys and shapes)."""
        if not sums:
            return {}
        keys = sorted(sums)
        flat = all_reduce_sum(torch.cat([sums[k].reshape(-1) for k in keys]), self.rt)
        parts = flat.split([sums[k].numel() for k in keys])
        return {k: part.reshape(sums[k].shape) for k, part in zip(keys, parts)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out LM loss and realized CR with hard decisions (full-sequence mode)."""
        # Compiled layers evaluate eagerly: an eval graph costs another long compile for a few
        # batches, and torch 2.11's inductor failed lowering DMC's eval-mode FlexAttention.
        stance = torch.compiler.set_stance("force_eager") if self.cfg.compile else contextlib.nullcontext()
        with stance:
            values = self._evaluate()
        self.last_eval = values
        return values

    def _write_summary(self) -> None:
        """Print the run's diagnostics and keep them in run/summary.json."""
        values = getattr(self, "last_eval", None) or {}
        report = self.objective.summary(values)
        if report:
            print(report)
        (self.run_dir / "summary.json").write_text(json.dumps(
            {"method": self.cfg.method, "target_cr": self.cfg.target_cr, "steps": self.step, **values}, indent=1))

    def _evaluate(self) -> dict:
        extra = self.objective.evaluation(self.model, self.rt.device)  # what the objective measures besides
        sums = torch.zeros(2, dtype=torch.float64, device=self.rt.device)  # loss·n, n
        for batch in self.data.val_batches(self.cfg.micro_batch_size, self.cfg.eval_batches, self.rt.rank,
                                           self.rt.world):
            batch = batch.to(self.rt.device)
            self.model.eval()
            out, lm_loss = self._autocast_forward(self.objective.eval_forward, self.model, batch)
            n = float((batch.labels[:, 1:] != -100).sum())
            extra.add(batch, out, n, self._autocast_forward)
            sums += torch.tensor([float(lm_loss) * n, n], dtype=torch.float64, device=self.rt.device)
        sums = all_reduce_sum(sums, self.rt)
        self.model.train()
        if sums[1] == 0:
            return {}
        values = {"val_loss": float(sums[0] / sums[1]), "val_ppl": math.exp(min(50.0, float(sums[0] / sums[1])))}
        values.update(extra.values(values, self.rt))
        return values

    def _state(self) -> dict:
        return {"step": self.step, "rows_consumed": self.step * self.rows_per_step,
                "rows_per_step": self.rows_per_step, "total_steps": self.total_steps,
                **self.objective.state_dict()}

    def run(self) -> pathlib.Path | None:
        """Train to the end of the plan (or ``max_steps``); write the final model at the end.

        A step whose loss (or gradient norm) is not finite is never checkpointed; more than
        ``nan_patience`` of them in a row stop the run with :class:`TrainingDiverged`, without a model
        (the last good checkpoint stays). The run directory's lock is released on return."""
        if self.finished:  # --resume of a run whose model is written: nothing to train or write
            self._release()
            return self.out
        try:
            return self._run()
        finally:
            self._release()

    def plan_summary(self) -> str:
        """One line: the stages and their steps, the global batch and the tokens it all takes."""
        cfg = self.cfg
        tokens_per_step = self.rows_per_step * self.data.seq_len
        stages = " + ".join(f"{name} {length}" for name, length in self.plan)
        text = (f"plan: {stages} = {self.total_steps} steps; global batch {self.rows_per_step} rows "
                f"(micro-batch {cfg.micro_batch_size} x grad-accum {cfg.grad_accum} x {self.rt.world} "
                f"process{'es' if self.rt.world > 1 else ''}) of {self.data.seq_len} tokens = "
                f"{tokens_per_step:,} tokens/step; {tokens_per_step * self.total_steps:,} tokens in all")
        if self.step:
            text += f"; resuming at step {self.step}"
        if cfg.max_steps is not None and cfg.max_steps < self.total_steps:
            text += f"; stopping at step {cfg.max_steps} (--max-steps)"
        return text

    def _run(self) -> pathlib.Path | None:
        from tqdm.auto import tqdm
        cfg = self.cfg
        stop = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        tokens_per_step = self.rows_per_step * self.data.seq_len
        if self.rt.is_main:
            print(self.plan_summary(), flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.objective.label, unit="step",
                   disable=not (self.rt.is_main and cfg.progress), dynamic_ncols=True)
        bad_steps = []  # the non-finite terms of the steps since the last finite one
        try:
            while self.step < stop:
                pos = locate(self.plan, self.step)
                start = time.perf_counter()
                values = self.train_step(pos)
                if pos.step == pos.length - 1:
                    self.objective.on_stage_end(self.model, pos.name)
                elapsed = time.perf_counter() - start
                self.step += 1
                values["tokens_per_s"] = tokens_per_step / elapsed
                values["memory_gib"] = _memory_gib(self.rt.device)
                non_finite = _non_finite(values)
                bad_steps = bad_steps + [(self.step, non_finite)] if non_finite else []
                if not non_finite and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                    values.update(self.evaluate())
                self.metrics.log(self.step, values)
                for callback in self.callbacks:
                    callback(self, self.step, values)
                bar.set_postfix(**_postfix(values))
                bar.update(1)
                if bad_steps:
                    if len(bad_steps) > cfg.nan_patience:
                        self._diverged(bad_steps)
                    continue  # a step that was not finite is never checkpointed
                stage_end = pos.step == pos.length - 1
                # (agreed by all ranks; the all-reduce only where a callback may ask)
                stopping = self.step == stop or bool(self.callbacks) and self._any_rank(self.stop_requested)
                if self.step % cfg.save_every == 0 or stage_end or stopping:
                    if not self._weights_finite():
                        self._diverged([(self.step, ["weights"])])
                    self.checkpointer.save(self.model, self.optimizer, self._state())
                if stopping:
                    break
        except KeyboardInterrupt:
            if self.rt.is_main:
                bar.clear()
                latest = self.checkpointer.latest()
                where = f"the last checkpoint is {latest.name}" if latest else "no checkpoint was written yet"
                print(f"interrupted at step {self.step}/{self.total_steps}; {where}: continue with --resume",
                      file=sys.stderr, flush=True)
            raise
        finally:
            bar.close()
            self.metrics.close()
        if bad_steps:  # the run ended inside the patience: never write a model that followed a non-finite loss
            self._diverged(bad_steps)
        if self.step < self.total_steps:
            if self.rt.is_main:
                print(f"stopped at step {self.step}/{self.total_steps}; continue with --resume")
            return None
        if not self._weights_finite():
            self._diverged([(self.step, ["weights"])])
        with interrupts_deferred("writing the model"):
            out = self.save_final()
        self._drop_old_checkpoints()
        return out

    def _drop_old_checkpoints(self) -> None:
        """A finished run keeps its last checkpoint only (the model is written; the checkpoint holds
        the optimizer state to train on from), unless ``keep_checkpoints`` is "all". What was kept
        and removed is in :attr:`checkpoints_note` (the CLI prints it)."""
        if self.cfg.keep_all_checkpoints:
            return
        removed = self.checkpointer.keep_only_latest()
        latest = self.checkpointer.latest()
        if latest is not None:
            self.checkpoints_note = (f"checkpoints: kept the last one, {latest.relative_to(self.out)}"
                                     + (f", removed {len(removed)} older" if removed else "")
                                     + " (--keep-checkpoints all keeps every one)")

    def _diverged(self, bad_steps: list[tuple[int, list[str]]]) -> None:
        first, terms = bad_steps[0]
        latest = self.checkpointer.latest()
        kept = (f"the last good checkpoint, {latest.name}, is kept in {self.checkpointer.root}" if latest
                else "no checkpoint had been written")
        more = f" and {len(bad_steps) - 1} more step(s)" if len(bad_steps) > 1 else ""
        what = "non-finite weights" if terms == ["weights"] else f"non-finite loss ({', '.join(terms)})"
        raise TrainingDiverged(
            f"training diverged: {what} at step {first}{more}; stopped without writing a model ({kept}). "
            "Start again with a lower --lr or more --warmup-steps (or raise --nan-patience to tolerate "
            "isolated non-finite steps)")

    # ------------------------------------------------------------------------------ output
    def save_final(self) -> pathlib.Path:
        """Write the DMC model (a stock one with ``method="plain"``) and tokenizer into ``cfg.out``
        (config.json last: a partly written directory is never loadable as a model)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rt.is_main:
            final = self._unsharded_copy(state)
            fold_logit_scale(final)  # the saved model reads a = k[D-1] - c, as the paper's and the engine's
            self._write_summary()
            prepare_for_saving(final, self.cfg)
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
        model = saved_class(self.model)(self.model.config)
        model.load_state_dict(state, strict=True)
        model.generation_config = self.model.generation_config
        return model.eval()


def _accumulate(totals: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    for key, value in values.items():
        totals[key] = totals[key] + value if key in totals else value


def _postfix(values: dict) -> dict:
    """The progress bar's numbers of a step: the CR only where the objective reports one."""
    postfix = {"stage": values["stage"], "loss": f"{values['lm_loss']:.3f}"}
    if "achieved_cr" in values:
        postfix["cr"] = f"{values['achieved_cr']:.2f}/{values['target_cr']:.2f}"
    return {**postfix, "tok_s": f"{values['tokens_per_s']:.0f}"}


def _non_finite(values: dict) -> list[str]:
    """The loss terms of a step's metrics that are NaN or infinite."""
    bad = []
    for key, value in values.items():
        if (key.endswith("loss") or key == "grad_norm") and isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{key}={value}")
    return bad


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
