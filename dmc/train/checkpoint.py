"""Sharded, atomic training checkpoints through ``torch.distributed.checkpoint``.

Layout under ``RUN/checkpoints``: ``step_00001234/`` (model + optimizer shards, ``state.json``
with step and data position, ``rng_rank{r}.pt``) and ``latest`` naming the newest complete one.
A checkpoint is written to ``step_….tmp`` and renamed only when every rank has finished, and
``latest`` is replaced atomically: a kill at any moment leaves the last good checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import Runtime, barrier


class Checkpointer:
    def __init__(self, root: pathlib.Path, runtime: Runtime, keep: int = 2) -> None:
        self.root, self.runtime, self.keep = root, runtime, keep

    def latest(self) -> pathlib.Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(self, model, optimizer, state: dict) -> pathlib.Path:
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

    def load(self, model, optimizer, path: pathlib.Path) -> dict:
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
        return json.loads((path / "state.json").read_text())

    def _prune(self) -> None:
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        done = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
