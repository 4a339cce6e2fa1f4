"""Runs a study: each (method, CR) in its own subdirectory of ``OUT/runs`` with its own
``result.json``. A finished run is skipped, an unfinished training resumes from its last
checkpoint, and a run another process is working on (a live ``.lock``) is left to it, so several
``dmc study`` processes can share a directory (``--only``).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gc
import json
import os
import pathlib
import shutil
import socket
import sys
import time

from typing import TYPE_CHECKING

from .settings import STUDY_FILE, Run, StudyError, StudySettings, check_heldout_apart, plain_run, \
    runtime_fields

if TYPE_CHECKING:
    from .evaluate import Evaluator


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: pathlib.Path, value) -> None:
    """Atomically (several processes may read while one writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_json(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def original_info(model: str) -> dict:
    """Shape of the original model; refuses DMC models and unsupported architectures."""
    import transformers

    from ..hf.modeling import FAMILIES
    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any loading failure is bad input
        raise StudyError(f"cannot read the model config of {model}: {str(e).splitlines()[0]}") from None
    stock = [f.model_type for f in FAMILIES]
    if config.model_type not in stock:
        if any(f.dmc_config_class.model_type == config.model_type for f in FAMILIES):
            raise StudyError(f"{model} is already a DMC model; a study starts from the original (stock) model")
        raise StudyError(f"{model} holds a {config.model_type!r} model; dmc study supports {', '.join(stock)}")
    heads = config.num_attention_heads
    return {"path": model, "model_type": config.model_type, "layers": config.num_hidden_layers,
            "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "hidden": config.hidden_size, "max_positions": getattr(config, "max_position_embeddings", None)}


class Study:
    def __init__(self, s: StudySettings) -> None:
        self.s = s
        self.root = pathlib.Path(s.out)
        self.runs_dir = self.root / "runs"
        self.model = original_info(s.model)
        self.heldout_files = check_heldout_apart(s.data, s.heldout, s.train.get("text_field", "text"))
        train_len = s.train_config("dmc", None, "x").seq_len
        self.seq_len = s.eval_seq_len or min(train_len, self.model["max_positions"] or train_len)
        self._evaluator: Evaluator | None = None

    # -------------------------------------------------------------------------- the study file
    def register(self, command: str) -> None:
        """Create or check ``OUT/study.json`` (one study per directory) and log this invocation."""
        import torch

        from .evaluate import device_name
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".study.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            saved = read_json(self.root / STUDY_FILE)
            identity = self.s.identity()
            if saved is None and self.runs_dir.exists() and any(self.runs_dir.iterdir()):
                raise StudyError(f"{self.root} holds runs but no {STUDY_FILE}; use another --out")
            if saved is not None and saved["identity"] != identity:
                changed = sorted(k for k in identity if saved["identity"].get(k) != identity[k])
                if "train" in changed:
                    old, new = saved["identity"]["train"], identity["train"]
                    changed += sorted(f"train.{k}" for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise StudyError(f"{self.root} holds a study with other settings ({', '.join(changed)}); use another "
                                 "--out or the same settings")
            settings = self.s.to_dict()
            runtime = runtime_fields()
            settings["train"] = {k: v for k, v in settings["train"].items() if k not in runtime}
            if saved is not None:  # CRs and methods may grow between invocations
                settings["crs"] = sorted(set(saved["settings"]["crs"]) | set(settings["crs"]))
                settings["methods"] = [m for m in dict.fromkeys(saved["settings"]["methods"] + settings["methods"])]
            invocations = (saved or {}).get("invocations", [])
            invocations.append({"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                "host": socket.gethostname(), "pid": os.getpid(),
                                "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))})
            write_json(self.root / STUDY_FILE, {
                "identity": identity, "settings": settings, "model": self.model, "eval_seq_len": self.seq_len,
                "heldout_files": [str(f) for f in self.heldout_files], "invocations": invocations})

    # -------------------------------------------------------------------------- result files
    def run_dir(self, run: Run) -> pathlib.Path:
        return self.runs_dir / run.dirname

    def result(self, run: Run) -> dict | None:
        return read_json(self.run_dir(run) / "result.json")

    def finished(self, run: Run) -> bool:
        result = self.result(run)
        return result is not None and result["status"] in ("done", "skipped", "failed")

    @contextlib.contextmanager
    def _claim(self, run: Run):
        """Yields True when this process may work on ``run`` (no other live process holds it)."""
        lock = self.run_dir(run) / ".lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                host, _, pid = lock.read_text().partition(" ") if lock.exists() else ("", "", "")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    lock.unlink(missing_ok=True)  # left by a process that died
                    continue
                log(f"{run.name}: another process works on it ({lock.read_text() if lock.exists() else '?'}); left "
                    "to it")
                yield False
                return
            os.write(fd, me.encode())
            os.close(fd)
            try:
                yield True
            finally:
                lock.unlink(missing_ok=True)
            return
        yield False

    # -------------------------------------------------------------------------- running
    def execute(self, runs: list[Run]) -> None:
        from ..train.checkpoint import RunLockedError
        from ..train.trainer import TrainingDiverged
        for i, run in enumerate(runs, 1):
            if self.finished(run):
                log(f"({i}/{len(runs)}) {run.name}: finished earlier, skipped")
                continue
            with self._claim(run) as mine:
                if not mine:
                    continue
                log(f"({i}/{len(runs)}) {run.name}")
                handler = {"original": self._original, "dmc": self._trained, "plain": self._trained,
                           "gqa": self._gqa, "h2o": self._eviction, "tova": self._eviction,
                           "snapkv": self._eviction}[run.method]
                try:
                    result = handler(run)
                except TrainingDiverged as e:  # an outcome of the study, not a reason to stop it
                    result = {"status": "failed", "reason": f"training diverged: {str(e).splitlines()[0]}",
                              "rows": []}
                except RunLockedError as e:
                    log(f"  {run.name}: {e}; left to it")
                    continue
                if result is not None:
                    write_json(self.run_dir(run) / "result.json", result)
                    for row in result.get("rows", []):
                        log(f"  → {row['run']}{' ' + row['budget_kind'] if 'budget_kind' in row else ''}: perplexity "
                            f"{row['perplexity']:.4g}, realized CR {row['realized_cr']:.3g}"
                            + (f", hard − relaxed {row['relaxed_gap']:+.4f} nats" if "relaxed_gap" in row else ""))
                    if result["status"] in ("skipped", "failed"):
                        log(f"  → {result['status']}: {result['reason']} (delete {self.run_dir(run)} to run it again)")
            _free_memory()

    @property
    def evaluator(self) -> Evaluator:
        from .evaluate import Evaluator
        if self._evaluator is None:
            self._evaluator = Evaluator(self.s, self.heldout_files, self.seq_len)
        return self._evaluator

    def _base_row(self, run: Run, method: str | None = None) -> dict:
        return {"run": run.name, "method": method or run.method, "target_cr": run.cr, "tokens": 0,
                "train_seconds": None}

    def _original(self, run: Run) -> dict:
        log(f"  evaluating the original model on {self.s.eval_windows} windows of {self.seq_len} tokens")
        row = {**self._base_row(run), "target_cr": 1.0, **self.evaluator.stock(pathlib.Path(self.s.model),
                                                                               self.model["kv_heads"])}
        return {"status": "done", "rows": [row]}

    def _trained(self, run: Run, source: pathlib.Path | None = None) -> dict | None:
        """DMC, plain continued training or (with ``source``) GQA up-training, then evaluation."""
        method = "dmc" if run.method == "dmc" else "plain"
        info = self._train(run, method, source or pathlib.Path(self.s.model))
        if info is None:
            return None
        model_dir = self.run_dir(run) / "model"
        log(f"  evaluating {run.name} on {self.s.eval_windows} windows of {self.seq_len} tokens")
        scores = self.evaluator.dmc(model_dir) if method == "dmc" else \
            self.evaluator.stock(model_dir, self.model["kv_heads"])
        row = {**self._base_row(run), "target_cr": run.cr if run.method != "plain" else 1.0, **scores,
               "tokens": info["tokens"], "train_seconds": info["train_seconds"], "train": info}
        if run.method == "plain":
            row["plan_of_cr"] = run.cr  # None: the plan every CR shares
        return {"status": "done", "rows": [row]}

    def _train(self, run: Run, method: str, source: pathlib.Path) -> dict | None:
        """One dmc.train.Retrofitter run into RUN/model; resumes an unfinished one. Returns the
        training summary, or None when the run stopped early (``max_steps``)."""
        from ..train import Retrofitter
        directory = self.run_dir(run)
        out, summary_file = directory / "model", directory / "train.json"
        if (out / "config.json").exists() and summary_file.exists():
            return read_json(summary_file)
        if out.exists() and not (out / "run" / "run.json").exists():
            shutil.rmtree(out)  # never got past the trainer's first write
        resume = (out / "run" / "run.json").exists()
        # A shared plain run does not depend on the CR: a fixed one keeps its identity stable when CRs are added.
        cr = run.cr if run.cr is not None else 2.0
        extra = {} if "progress" in self.s.train else {"progress": sys.stderr.isatty()}
        cfg = self.s.train_config(method, cr, str(out), model=str(source), resume=resume, **extra)
        trainer = Retrofitter(cfg)
        tokens = trainer.total_steps * trainer.rows_per_step * trainer.data.seq_len
        plan = ", ".join(f"{name} {steps}" for name, steps in trainer.plan)
        log(f"  {'resuming' if resume else 'training'} ({method}{'' if method == 'plain' else f', target CR {cr:g}'}"
            f"{', from ' + source.name if source != pathlib.Path(self.s.model) else ''}): {plan} steps of "
            f"{trainer.rows_per_step} rows × {trainer.data.seq_len} tokens = {tokens / 1e6:.3g}M tokens")
        if not cfg.progress:
            _print_progress(trainer)
        progress = directory / "progress.json"
        wall = (read_json(progress) or {}).get("wall_seconds", 0.0)
        started = time.time()
        try:
            finished = trainer.run()
        finally:
            write_json(progress, {"wall_seconds": wall + time.time() - started})
        del trainer
        if finished is None:
            log(f"  {run.name} stopped before the end of its plan (max_steps); run the study again to resume it")
            return None
        summary = _train_summary(out, tokens)
        summary.update(plan=[list(p) for p in cfg.stage_steps()], wall_seconds=round(wall + time.time() - started, 1),
                       source=str(source))
        write_json(summary_file, summary)
        shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # the final model is saved
        return summary

    def _gqa(self, run: Run) -> dict | None:
        import torch
        import transformers

        from ..baselines import mean_pool_kv_heads
        kv = self.model["kv_heads"]
        if run.cr != int(run.cr) or kv % int(run.cr):
            reason = (f"GQA pools whole groups of KV heads: {kv} KV heads do not split into groups of {run.cr:g} "
                      f"(divisors: {', '.join(str(d) for d in range(2, kv + 1) if kv % d == 0) or 'none'})")
            return {"status": "skipped", "reason": reason, "rows": []}
        pooled = self.run_dir(run) / "pooled"
        if not (pooled / "config.json").exists():
            log(f"  mean-pooling {kv} KV heads into {kv // int(run.cr)} (dmc gqa --ratio {int(run.cr)})")
            stock = transformers.AutoModelForCausalLM.from_pretrained(self.s.model, dtype=torch.float32)
            tmp = pooled.with_name(".pooled.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            mean_pool_kv_heads(stock, int(run.cr)).save_pretrained(tmp)
            transformers.AutoTokenizer.from_pretrained(self.s.model).save_pretrained(tmp)
            os.replace(tmp, pooled)
        return self._trained(run, source=pooled)

    def _eviction(self, run: Run) -> dict | None:
        """H2O, TOVA or SnapKV at the nominal budget and at the budget matched to DMC's realized CR at the
        same target; "partial" (and completed by a later invocation) while DMC has not finished."""
        from ..baselines import budget_for
        from ..baselines.eviction import METHOD_NAMES
        previous = self.result(run) or {"rows": []}
        rows = {r["budget_kind"]: r for r in previous["rows"]}
        base_run = plain_run(self.s, run.cr) if self.s.evict_base == "plain" else None
        if base_run is not None and not self.finished(base_run):
            log(f"  waits for {base_run.name} (the model the eviction baselines evict on, --evict-base plain)")
            return None
        base = pathlib.Path(self.s.model) if base_run is None else self.run_dir(base_run) / "model"
        budgets = {"nominal": (run.cr, budget_for(self.seq_len, run.cr))}
        waiting = None
        if "dmc" in self.s.methods:
            dmc = self.result(Run("dmc", run.cr))
            if dmc is not None and dmc["status"] == "done":
                realized = dmc["rows"][0]["realized_cr"]
                budgets["matched"] = (realized, budget_for(self.seq_len, realized))
            elif dmc is not None:
                log(f"  no budget matched to DMC: dmc@{run.cr:g} {dmc['status']} ({dmc.get('reason')})")
            else:
                waiting = f"the budget matched to DMC waits for dmc@{run.cr:g}"
        for kind, (cr, budget) in budgets.items():
            if kind in rows:
                continue
            same = next((r for r in rows.values() if r["budget"] == budget), None)
            if same is None:
                log(f"  {METHOD_NAMES[run.method]}, {kind} budget: {budget} of {self.seq_len} slots per KV head "
                    f"(CR {cr:.3g}), token by token on {base.name}")
                same = self.evaluator.eviction(base, run.method, budget)
            rows[kind] = {**self._base_row(run), **{k: v for k, v in same.items() if k not in self._base_row(run)},
                          "budget_kind": kind, "budget_cr": cr, "evicts_on": "original" if base_run is None
                          else base_run.name}
        ordered = [rows[k] for k in ("nominal", "matched") if k in rows]
        if waiting:
            log(f"  {waiting}: run the study again once it has finished")
            return {"status": "partial", "waiting": waiting, "rows": ordered}
        return {"status": "done", "rows": ordered}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_progress(trainer, lines: int = 8) -> None:
    """Without a progress bar, a line every 1/8 of the run from what the trainer logs anyway."""
    metrics = getattr(trainer, "metrics", None)
    if metrics is None or not hasattr(metrics, "log"):
        return
    every, write, started = max(1, trainer.total_steps // lines), metrics.log, time.time()

    def log_and_print(step: int, values: dict) -> None:
        write(step, values)
        if step % every == 0 or step == trainer.total_steps:
            cr = f", CR {values['achieved_cr']:.2f}/{values['target_cr']:.2f}" if "achieved_cr" in values else ""
            log(f"    step {step}/{trainer.total_steps} ({values.get('stage')}): loss {values.get('lm_loss', 0):.3f}"
                f"{cr}, {time.time() - started:.0f} s")

    metrics.log = log_and_print


def _train_summary(out: pathlib.Path, tokens: int) -> dict:
    """Tokens, time in optimizer steps (from the per-step speeds: resumes and evaluations do not
    count) and the last logged numbers of a finished trainer run."""
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    tokens_per_step = tokens / max(1, records[-1]["step"]) if records else 0
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s"))
    summary = {"tokens": tokens, "steps": records[-1]["step"] if records else 0, "train_seconds": round(seconds, 3)}
    last = records[-1] if records else {}
    for key in ("lm_loss", "achieved_cr", "val_loss", "val_loss_relaxed", "val_cr"):
        if isinstance(last.get(key), (int, float)):
            summary[f"final_{key}"] = round(last[key], 4)
    return summary
