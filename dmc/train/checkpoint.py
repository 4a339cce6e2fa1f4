"""Sharded, atomic training checkpoints through ``torch.distributed.checkpoint``, and the lock of
a run directory.

Layout under ``RUN/checkpoints``: ``step_00001234/`` (model + optimizer shards, ``state.json``
with step and data position, ``rng_rank{r}.pt``) and ``latest`` naming the newest complete one.
A checkpoint is written to ``step_….tmp`` and renamed only when every rank has finished, and
``latest`` is replaced atomically: a kill at any moment leaves the last good checkpoint loadable.
An interrupt (Ctrl-C, SIGINT) that arrives while a checkpoint is written is held back until the
checkpoint is complete. ``RUN/lock`` is locked (``flock``) by the process training into the run:
the kernel releases it when that process ends in any way, so a killed run never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory."""

    def __init__(self, out: pathlib.Path, pid: int | None) -> None:
        who = f"another process (pid {pid})" if pid else "another process"
        super().__init__(f"{who} is training into {out}; wait for it to end or stop it, or choose another --out")
        self.pid = pid


class RunLock:
    """An exclusive ``flock`` on ``run_dir/lock`` holding the owner's pid. Not blocking: a second
    process fails at once with :class:`RunLockedError`. Released by :meth:`release` or when the
    process ends (also by SIGKILL)."""

    NAME = "lock"

    def __init__(self, run_dir: pathlib.Path, out: pathlib.Path | None = None) -> None:
        self.path = run_dir / self.NAME
        self.out = out or run_dir.parent
        self._file = None

    def acquire(self) -> "RunLock":
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunLockedError(self.out, self._holder()) from None
            # The holder may have removed the file between our open and flock: lock the file that is there.
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self, remove: bool = False) -> None:
        if self._file is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


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


# ------------------------------------------------------------------------------ the run directory
# What a run writes into OUT besides run/: the save_pretrained model and tokenizer (and the
# directory they are first written to). --overwrite removes these and run/, nothing else.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "model*.safetensors", "model*.safetensors.index.json",
                       "pytorch_model*.bin", "pytorch_model*.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "vocab.json", "vocab.txt",
                       "merges.txt", "chat_template.jinja", "chat_template.json", ".model.tmp")


def our_model_files(out: pathlib.Path) -> list[pathlib.Path]:
    found = {p for pattern in MODEL_FILE_PATTERNS for p in out.glob(pattern)}
    return sorted(found)


def only_leftovers(out: pathlib.Path) -> bool:
    """OUT is missing, empty, or holds only what a start killed before it wrote run.json leaves:
    ``run/`` with at most the lock file in it."""
    if not out.exists():
        return True
    for entry in out.iterdir():
        if entry.name != "run" or not entry.is_dir():
            return False
        if any(p.name != RunLock.NAME for p in entry.iterdir()):
            return False
    return True


def discard_run(out: pathlib.Path) -> list[pathlib.Path]:
    """Remove a previous run from OUT: everything in ``run/`` but the lock (held by the caller) and
    the model files a run writes; any other file in OUT stays. Returns what was removed."""
    removed = []
    run_dir = out / "run"
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.name == RunLock.NAME:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    for entry in our_model_files(out):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        removed.append(entry)
    return removed


def _real(path: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _glob_matches(entry: str) -> list[pathlib.Path]:
    import glob
    expanded = os.path.expanduser(entry)
    if glob.has_magic(expanded):
        return [_real(p) for p in glob.glob(expanded, recursive=True)]
    return [_real(expanded)]


def check_output_location(out: str | pathlib.Path, model: str | pathlib.Path, data: list[str],
                          config_error=ValueError) -> None:
    """Refuse an --out that a run must never write into (or whose --overwrite could remove the
    user's files): the file system root, the home or current directory (or a directory holding
    them), the input model's directory and the training data (equal, holding them, or inside them),
    and an existing file. Raises ``config_error`` with a one-line message."""
    target = _real(out)
    if target == pathlib.Path(target.anchor):
        raise config_error(f"--out {out} is the root of the file system; pass a new directory for the run")
    for name, place in (("your home directory", _real("~")), ("the current directory", _real(os.getcwd()))):
        if target == place or target in place.parents:
            what = name if target == place else f"a directory holding {name}"
            raise config_error(f"--out {out} is {what}; pass a new directory for the run (e.g. runs/NAME)")
    for kind, paths in (("the input model", [_real(model)]),
                        *(("the training data", _glob_matches(entry)) for entry in data)):
        for path in paths:
            if target == path:
                raise config_error(f"--out {out} is {kind} ({path}); choose another --out, a new directory")
            if target in path.parents:
                raise config_error(f"--out {out} holds {kind} ({path}); choose another --out, a new directory")
            if path in target.parents:
                raise config_error(f"--out {out} is inside {kind} ({path}); choose a directory outside it")
    if target.exists() and not target.is_dir():
        raise config_error(f"--out {out} is a file; pass a directory (new, empty, or a run of ours)")
