"""The run directory of a training: ``OUT/run`` beside the model that ``OUT`` receives at the end.

- **One process at a time**: ``RUN/lock`` is locked (``flock``) by the process training into the
  run; the kernel releases it when that process ends in any way, so a killed run never leaves it
  stuck.
- **One run per directory**: ``RUN/run.json`` holds the run's identity (the settings that change
  what it computes); another run with other settings is refused, the same one is resumed.
- **What it holds**: nothing yet (a new run), an unfinished run (``--resume``), or a finished one
  (its model in ``OUT``, ``config.json`` written last). ``--overwrite`` removes only what a run
  wrote: ``run/`` and the model files (:func:`discard_run`).
- **Where it may be**: never the input model's or the data's directory, home, ``.`` or ``/``
  (:func:`check_output_location`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import shutil

from .distributed import Runtime, barrier

RUN_FILE = "run.json"


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


class RunDirectory:
    """``OUT`` and ``OUT/run`` of one training, for the trainer: :meth:`open` checks what ``OUT``
    holds and takes the lock (writing nothing else), :meth:`record` writes the run's identity once
    the start has succeeded, :meth:`abandon` undoes a failed start, :meth:`release` ends the run.

    ``error`` is the exception class of the one-line refusals (the trainer's ``ConfigError``)."""

    NEW, UNFINISHED, FINISHED = "new", "unfinished", "finished"

    def __init__(self, out: pathlib.Path, runtime: Runtime, error: type[Exception] = ValueError) -> None:
        self.out = out
        self.path = out / "run"
        self.runtime = runtime
        self.error = error
        self._lock: RunLock | None = None
        self._made_dirs: list[pathlib.Path] = []
        self._discard_previous = False

    @property
    def run_file(self) -> pathlib.Path:
        return self.path / RUN_FILE

    def open(self, identity: dict, resume: bool, overwrite: bool) -> str:
        """Take the lock and say what ``OUT`` holds for a run of ``identity``: :attr:`NEW` (nothing,
        or a run that ``overwrite`` will replace), :attr:`UNFINISHED` (``resume``) or :attr:`FINISHED`
        (``resume`` of a run whose model is written). Anything else is refused with one line."""
        self._take_lock()
        if not self.run_file.exists():
            if resume:
                raise self.error(f"nothing to resume in {self.out}: no run was started there")
            if not only_leftovers(self.out):
                what = ("holds a model that no dmc run wrote (no run/run.json)" if (self.out / "config.json").exists()
                        else "exists and is not a dmc run directory")
                hint = " (--overwrite only replaces a dmc run)" if overwrite else ""
                raise self.error(f"{self.out} {what}; choose an empty or new --out{hint}")
            return self.NEW
        try:
            previous = json.loads(self.run_file.read_text())
        except (OSError, ValueError) as e:
            if overwrite:
                self._discard_previous = True
                return self.NEW
            raise self.error(f"{self.run_file} cannot be read ({e}); pass --overwrite to discard the run in "
                             f"{self.out}") from None
        if overwrite:
            self._discard_previous = True
            return self.NEW
        previous.setdefault("method", "dmc")  # runs started before TrainConfig.method existed
        normalized = json.loads(json.dumps(identity))
        changed = sorted(k for k in normalized if k not in previous or previous[k] != normalized[k])
        if changed:  # (settings run.json has that are no longer part of a run's identity do not count)
            raise self.error(f"{self.out} holds a different run (settings differ: {', '.join(changed)}); "
                             "choose another --out or pass --overwrite to discard it")
        finished = (self.out / "config.json").exists()
        if finished and not resume:
            raise self.error(f"{self.out} already holds the finished model of this run; choose another --out, "
                             "or pass --overwrite to train it again")
        if not resume:
            raise self.error(f"{self.out} holds an unfinished run with these settings; pass --resume to "
                             "continue it or --overwrite to start again")
        return self.FINISHED if finished else self.UNFINISHED

    def _take_lock(self) -> None:
        """Rank 0 creates OUT/run (noting what it created) and locks OUT/run/lock; every rank learns
        the outcome."""
        error = None
        if self.runtime.is_main:
            try:
                missing = [d for d in (self.path, *self.path.parents) if not d.exists()]
                self.path.mkdir(parents=True, exist_ok=True)
                self._made_dirs = missing  # deepest first
                probe = self.out / f".dmc-write-test-{os.getpid()}"
                probe.touch()
                probe.unlink()
                self._lock = RunLock(self.path, self.out).acquire()
            except RunLockedError as e:
                error = str(e)
            except OSError as e:
                error = (f"cannot write into --out {self.out} ({e.strerror or e}); choose a directory you can "
                         "write to")
        if self.runtime.distributed:
            import torch.distributed as dist
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error:
            raise self.error(error)

    def record(self, identity: dict, resume: bool) -> None:
        """The start succeeded: remove the previous run (--overwrite) and record this one."""
        if self.runtime.is_main and not resume:
            if self._discard_previous:
                discard_run(self.out)
            self.run_file.write_text(json.dumps(identity, indent=1))
        barrier(self.runtime)

    def abandon(self) -> None:
        """A start failed: release the lock and remove what this start created, so that the
        corrected command is not refused (an existing run is left as it was)."""
        fresh = not self.run_file.exists()
        if self._lock is not None:
            self._lock.release(remove=fresh)
            self._lock = None
        if fresh and self.runtime.is_main:
            for d in [self.path, *self._made_dirs]:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# ------------------------------------------------------------------------------ what OUT may be and hold
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
