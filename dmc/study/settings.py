"""What a study runs: its settings, the runs it is made of, and which of them ``--only`` picks.

Training settings are :class:`~dmc.train.TrainConfig` fields, from a recipe file and ``--set
key=value`` (any field, including ones added after this module was written); the study sets the
model, data, output, target CR and method of each run itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import pathlib
import types
import typing
from dataclasses import dataclass, field

METHODS = ("dmc", "plain", "gqa", "h2o", "tova", "snapkv")
EVICTION = ("h2o", "tova", "snapkv")
EVICT_BASES = ("original", "plain")
# TrainConfig fields each run gets from the study, never from --recipe/--set
PER_RUN = ("model", "data", "out", "target_cr", "method", "resume", "overwrite")
STUDY_FILE = "study.json"


class StudyError(ValueError):
    """Bad input to a study; the message (one line) says what to change."""


def _config_class():
    from ..train import TrainConfig
    return TrainConfig


def train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_config_class())}


def runtime_fields() -> set[str]:
    """TrainConfig fields that do not change what a run computes (logging, checkpoints, stops):
    they may differ between invocations and are not saved with the study."""
    cfg = _config_class()()
    return set(dataclasses.asdict(cfg)) - set(cfg.training_identity())


# ------------------------------------------------------------------------------ --set and --recipe
def _parse_value(name: str, text: str):
    """``text`` as the type of TrainConfig field ``name`` (ints, floats, bools, lists, None)."""
    hint = typing.get_type_hints(_config_class())[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if type(None) in options and text.strip().lower() in ("none", "null", ""):
        return None
    base = next((a for a in options if a is not type(None)), str)
    kind, inner = typing.get_origin(base) or base, typing.get_args(base)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes", "on")
        if kind is int:
            value = float(text)
            if value != int(value):
                raise ValueError(text)
            return int(value)
        if kind is float:
            return float(text)
        if kind is list:
            items = [t.strip() for t in text.strip().strip("[]").split(",") if t.strip()]
            item = inner[0] if inner else str
            return [item(t) for t in items]
    except ValueError:
        raise StudyError(f"--set {name}={text}: not a valid {getattr(kind, '__name__', kind)}") from None
    if kind is str:
        return text
    import yaml
    return yaml.safe_load(text)


def _check_keys(keys, where: str) -> None:
    known = train_fields()
    for key in keys:
        if key in PER_RUN:
            raise StudyError(f"{where}: {key} is set by the study for each run (--crs, --methods, MODEL, --data, "
                             "--out); leave it out")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            raise StudyError(f"{where}: unknown training setting {key!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; settings are dmc.train.TrainConfig fields, as `dmc retrofit --help` lists them")


def parse_assignments(items: list[str] | None) -> dict:
    """``["lr=3e-4", "stages=zero-out,retrofit"]`` -> TrainConfig values."""
    values = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StudyError(f"--set {item!r}: write KEY=VALUE (a TrainConfig field, e.g. lr=3e-4)")
        _check_keys([key], f"--set {item}")
        values[key] = _parse_value(key, text.strip())
    return values


def load_recipe(path: str | None) -> dict:
    """TrainConfig values from a YAML or JSON file."""
    if not path:
        return {}
    file = pathlib.Path(path)
    if not file.is_file():
        raise StudyError(f"recipe file {path} does not exist")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is bad input
        raise StudyError(f"recipe file {path} does not parse: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise StudyError(f"recipe file {path} must hold a mapping of TrainConfig fields")
    _check_keys(values, f"recipe {path}")
    return values


# ------------------------------------------------------------------------------ settings
@dataclass
class StudySettings:
    """Everything a study needs. ``train`` holds TrainConfig values shared by every training run."""

    model: str
    data: list[str]
    heldout: list[str]
    out: str
    crs: list[float]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    train: dict = field(default_factory=dict)
    eval_seq_len: int | None = None  # None: the training seq_len, capped at the model's positions
    eval_windows: int = 64
    eval_batch_size: int = 4
    eval_dtype: str = "float32"
    evict_base: str = "original"  # H2O/TOVA/SnapKV on the untouched original, or on plain continued training
    device: str | None = None  # evaluation device (training: the trainer's own choice)

    IDENTITY = ("model", "data", "heldout", "train", "eval_seq_len", "eval_windows", "eval_dtype", "evict_base")

    def validate(self) -> None:
        if not self.crs:
            raise StudyError("no compression ratios: pass --crs, e.g. --crs 2 4 8")
        bad = [cr for cr in self.crs if not (cr > 1 and math.isfinite(cr))]
        if bad:
            raise StudyError(f"compression ratios must be > 1 (2 = half the cache), got {bad[0]:g}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise StudyError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if self.evict_base not in EVICT_BASES:
            raise StudyError(f"--evict-base must be one of {', '.join(EVICT_BASES)}")
        if self.evict_base == "plain" and "plain" not in self.methods and set(self.methods) & set(EVICTION):
            raise StudyError("--evict-base plain evicts on the plain continued model: keep 'plain' in --methods")
        if self.eval_dtype not in ("float32", "bfloat16"):
            raise StudyError(f"--eval-dtype must be float32 or bfloat16, got {self.eval_dtype}")
        for name in ("eval_windows", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise StudyError(f"--{name.replace('_', '-')} must be >= 1")
        if self.eval_seq_len is not None and self.eval_seq_len < 2:
            raise StudyError("--eval-seq-len must be >= 2")
        if not (pathlib.Path(self.model) / "config.json").is_file():
            raise StudyError(f"{self.model} is not a Hugging Face model directory (no config.json)")
        self.train_config("dmc", max(self.crs), str(pathlib.Path(self.out) / "runs" / "check")).validate()

    def train_config(self, method: str, cr: float | None, out: str, model: str | None = None, **extra):
        """The TrainConfig of one training run (``cr`` None: a CR-independent plan)."""
        from ..train import ConfigError
        values = {**self.train, **extra, "model": model or self.model, "data": list(self.data), "out": out,
                  "target_cr": float(cr if cr is not None else max(self.crs)), "method": method}
        try:
            return _config_class()(**values)
        except (ConfigError, TypeError) as e:
            raise StudyError(f"training settings: {e}") from None

    def plain_is_shared(self) -> bool:
        """Whether every CR trains for the same steps (e.g. retrofit_steps set): then one plain run
        serves all CRs; else plain runs once per CR with that CR's DMC plan (same tokens each)."""
        plans = {json.dumps(self.train_config("dmc", cr, "x").stage_steps()) for cr in (2.0, 3.0)}
        return len(plans) == 1

    def identity(self) -> dict:
        """What a study directory is about: invocations on one directory must agree on it."""
        values = {k: getattr(self, k) for k in self.IDENTITY}
        runtime = runtime_fields()
        values["train"] = {k: v for k, v in self.train.items() if k not in runtime}
        return json.loads(json.dumps(values))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def fmt_cr(cr: float) -> str:
    return f"{cr:g}"


# ------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Run:
    """One (method, CR) of the study: its own subdirectory and result file."""

    method: str  # "original" or one of METHODS
    cr: float | None = None  # None: the original, or the plain run shared by every CR

    @property
    def name(self) -> str:
        return self.method if self.cr is None else f"{self.method}@{fmt_cr(self.cr)}"

    @property
    def dirname(self) -> str:
        return self.method if self.cr is None else f"{self.method}-{fmt_cr(self.cr)}x"


def plan_runs(s: StudySettings) -> list[Run]:
    """Every run of the study, in the order they execute: the original, DMC (so that the eviction
    budgets can follow its realized slots), plain, GQA, H2O, TOVA, SnapKV."""
    crs = sorted(set(s.crs))
    runs = [Run("original")]
    runs += [Run("dmc", cr) for cr in crs if "dmc" in s.methods]
    if "plain" in s.methods:
        runs += [Run("plain")] if s.plain_is_shared() else [Run("plain", cr) for cr in crs]
    for method in ("gqa", *EVICTION):
        if method in s.methods:
            runs += [Run(method, cr) for cr in crs]
    return runs


def plain_run(s: StudySettings, cr: float | None) -> Run:
    """The plain continued-training run with the same tokens as DMC at ``cr``."""
    return Run("plain") if cr is None or s.plain_is_shared() else Run("plain", cr)


def select_runs(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs named by ``--only`` (``METHOD`` or ``METHOD@CR``); all of them without it."""
    if not only:
        return runs
    chosen = []
    for item in only:
        method, _, cr_text = item.partition("@")
        try:
            cr = float(cr_text) if cr_text else None
        except ValueError:
            raise StudyError(f"--only {item}: write METHOD or METHOD@CR, e.g. dmc@4") from None
        hits = [r for r in runs if r.method == method and (cr is None or r.cr is None or r.cr == cr)]
        if not hits:
            names = ", ".join(r.name for r in runs)
            raise StudyError(f"--only {item}: no such run in this study (runs: {names})")
        chosen += [r for r in hits if r not in chosen]
    return [r for r in runs if r in chosen]


# ------------------------------------------------------------------------------ held-out data
def check_heldout_apart(data: list[str], heldout: list[str], text_field: str = "text") -> list[pathlib.Path]:
    """The held-out files; raises StudyError when one is also a training file (same path, or the
    same bytes under another name), or when none of them is UTF-8 text. Returns the held-out files."""
    from ..train import ConfigError
    from ..train.data import discover_files, read_documents
    try:
        train_files = discover_files(data)
    except ConfigError as e:
        raise StudyError(f"--data: {e}") from None
    from ..train.data import BadFileError, no_text_error
    try:
        held_files = discover_files(heldout, "held-out data")
        bad = []
        for f in held_files:  # nothing to evaluate on is found before any training starts
            try:
                next(read_documents(f, text_field, on_bad_file="error"), None)
            except BadFileError as e:
                bad.append((e.path, e.reason))
        if len(bad) == len(held_files):
            raise no_text_error(bad, len(held_files))
    except ConfigError as e:
        raise StudyError(f"--heldout: {e}") from None
    same = sorted(set(train_files) & set(held_files))
    if same:
        raise StudyError(f"held-out file {same[0]} is also training data ({len(same)} file(s) overlap): the held-out "
                         "set must be kept out of --data")
    by_size: dict[int, list[pathlib.Path]] = {}
    for f in train_files:
        by_size.setdefault(f.stat().st_size, []).append(f)
    for f in held_files:
        twins = by_size.get(f.stat().st_size, [])
        if twins:
            digest = _digest(f)
            twin = next((t for t in twins if _digest(t) == digest), None)
            if twin is not None:
                raise StudyError(f"held-out file {f} has the same content as training file {twin}: the held-out "
                                 "set must be kept out of --data")
    return held_files


def _digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
