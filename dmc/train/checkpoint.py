"""Sharded, atomic training checkpoints through ``torch.distributed.checkpoint``.

Layout under ``RUN/checkpoints``: ``step_00001234/`` (model + optimizer shards, ``state.json``
with step and data position, ``rng_rank{r}.pt``) and ``latest`` naming the newest complete one.
A checkpoint is written to ``step_….tmp`` and renamed only when every rank has finished, and
``latest`` is replaced atomically: a kill at any moment leaves the last good checkpoint loadable.
An interrupt (Ctrl-C, SIGINT) that arrives while a checkpoint is written is held back until the
checkpoint is complete. The run directory around the checkpoints (its lock, its identity, what
``--overwrite`` may remove) is :mod:`dmc.train.rundir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import sys
import threading

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: not caught by `except Exception`
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import Runtime, barrier
from .rundir import RunLockedError  # noqa: F401 - dmc.study imports it from here


@contextlib.contextmanager
def interrupts_deferred(what: str = "the checkpoint"):
    """Hold back SIGINT for the block (a checkpoint or model write), then deliver it: the interrupt
    still stops the process (exit 130 from the CLI), but never leaves a half-written file behind.
    A no-op outside the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame):  # noqa: ARG001
        if not received:
            print(f"interrupt received: finishing {what} first", file=sys.stderr, flush=True)
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)  # the previous handler acts on it now (KeyboardInterrupt by default)


def unwrap_checkpoint_error(error: BaseException) -> BaseException:
    """The first rank's own exception inside a ``CheckpointException`` (which wraps every failure of
    ``torch.distributed.checkpoint``, interrupts included: those are raised again as they were)."""
    if not isinstance(error, CheckpointException):
        return error
    inner = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
    for exc in inner:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
    return inner[0] if inner and isinstance(inner[0], BaseException) else error


class Checkpointer:
    """The checkpoints of one run under ``root``; the newest ``keep`` are kept while training (0: all)."""

    def __init__(self, root: pathlib.Path, runtime: Runtime, keep: int = 2) -> None:
        self.root, self.runtime, self.keep = root, runtime, keep

    def latest(self) -> pathlib.Path | None:
        complete = self.complete()
        return complete[0] if complete else None

    def complete(self) -> list[pathlib.Path]:
        """Checkpoints whose writing finished (``state.json`` is written last), newest first. The
        newest is normally the one ``latest`` names; a kill between the rename of a checkpoint and
        the update of ``latest`` leaves a newer complete one, which counts too."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step_*") if "." not in p.name and (p / "state.json").is_file()]
        return sorted(done, key=lambda p: p.name, reverse=True)

    def save(self, model, optimizer, state: dict) -> pathlib.Path:
        with interrupts_deferred(f"checkpoint step {state['step']}"):
            return self._save(model, optimizer, state)

    def _save(self, model, optimizer, state: dict) -> pathlib.Path:
        name = f"step_{state['step']:08d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.runtime)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng_rank{self.runtime.rank}.pt")
        barrier(self.runtime)
        if self.runtime.is_main:
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(self.root / "latest", name)
            self._prune()
        barrier(self.runtime)
        return final

    def read_state(self, path: pathlib.Path) -> dict:
        return json.loads((path / "state.json").read_text())

    def load(self, model, optimizer, path: pathlib.Path) -> dict:
        state_json = self.read_state(path)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng_rank{self.runtime.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return state_json

    def set_aside(self, path: pathlib.Path) -> pathlib.Path:
        """Rename an unreadable checkpoint to ``step_….unreadable``: never loaded or counted again,
        kept for inspection until the run has written that step anew. Returns the new path."""
        target = path.with_name(path.name + ".unreadable")
        if self.runtime.is_main:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
        barrier(self.runtime)
        return target

    def keep_only_latest(self) -> list[pathlib.Path]:
        """Remove every checkpoint but the newest complete one (the end of a finished run: the
        model is written, the last checkpoint stays to train on from). Returns what was removed."""
        latest = self.latest()
        removed = []
        if self.runtime.is_main and latest is not None:
            for old in self.root.glob("step_*"):
                if old != latest:
                    shutil.rmtree(old, ignore_errors=True)
                    removed.append(old)
        barrier(self.runtime)
        return sorted(removed)

    def _prune(self) -> None:
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        done = sorted(p for p in self.root.glob("step_*") if "." not in p.name)
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for bad in self.root.glob("step_*.unreadable"):  # the run has written that step again (or a later one)
            if done and bad.name.split(".")[0] <= done[-1].name:
                shutil.rmtree(bad, ignore_errors=True)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
