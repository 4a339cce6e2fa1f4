"""Training data: discover files, tokenize once into memory-mapped shards, pack into rows.

- Sources: text files (one document each), JSONL (one document per line, a named field) and
  Parquet (a named column), given as files, directories (searched recursively) or globs.
- Only UTF-8 text is read. A file with a NUL byte (binary) or bytes that are not UTF-8 is left out
  and reported once, naming it (``on_bad_file="skip"``, the default), or refused
  (``on_bad_file="error"``). A JSONL line that is not a JSON object, or lacks the text field,
  raises ``DataError`` naming the file and line.
- Each source file becomes a cached shard: ``tokens.bin`` (uint32) and ``offsets.npy`` (document
  boundaries), keyed by the file's path, size, mtime and the tokenizer, so a corpus is tokenized
  once and read back with ``np.memmap``. A file found not to be text is cached as such too.
- Tokenization batches the documents of many files into one call of the fast tokenizer's Rust
  batch encoder, which runs on all cores (``RAYON_NUM_THREADS`` caps them); it gives the same ids
  as calling the tokenizer on each document, which stays the path for other tokenizers.
- Documents are split into train and held-out sets; train documents are shuffled per epoch
  (seeded), concatenated and cut into rows of ``seq_len``. Each row carries ``document_ids`` and
  per-document ``position_ids`` (no merging or attention across documents), and its labels
  skip the first token of every document.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".tex",
                 ".html", ".css", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ""}
DATA_SUFFIXES = {".jsonl", ".parquet"}
ON_BAD_FILE = ("skip", "error")
BATCH_CHARS = 2 << 20  # text per call of the batch encoder: enough documents to keep every core busy
SPILL_BYTES = 64 << 20  # a shard's tokens go to disk in pieces of about this size (large files)
REPORT_PATHS = 10  # a report of skipped files names this many


class DataError(ConfigError):
    """Data that cannot be read as intended; the one-line message names the file (and line)."""


class BadFileError(DataError):
    """A file that is not UTF-8 text: it holds a NUL byte (binary) or bytes that are not UTF-8."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path} is not UTF-8 text: {reason}; remove it from the data, or pass --on-bad-file skip "
                         "(on_bad_file: skip in a config file) to leave such files out")
        self.path, self.reason = str(path), reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class BadFileWarning(UserWarning):
    """Files left out of the data because they are not UTF-8 text."""


def _check_on_bad_file(on_bad_file: str) -> None:
    if on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"on_bad_file must be one of {', '.join(ON_BAD_FILE)}, not {on_bad_file!r}")


def discover_files(sources: list[str], what: str = "training data") -> list[pathlib.Path]:
    """Expand files, directories (recursively) and globs into a sorted list of data files; ``what``
    names the data in the errors (e.g. "held-out data")."""
    found: set[pathlib.Path] = set()
    for source in sources:
        matches = [pathlib.Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        if not matches:
            raise ConfigError(f"{what} {source!r} does not exist (no file, directory or glob match)")
        for match in matches:
            if match.is_dir():
                for path in match.rglob("*"):
                    if path.is_file() and not any(part.startswith(".") for part in path.relative_to(match).parts) \
                            and (path.suffix in TEXT_SUFFIXES | DATA_SUFFIXES):
                        found.add(path.resolve())
            elif match.is_file():
                found.add(match.resolve())
    files = sorted(f for f in found if f.stat().st_size > 0)
    if not files:
        raise ConfigError(f"{what} {sources} holds no non-empty files")
    return files


# ------------------------------------------------------------------------------ reading
def _read_text(path: pathlib.Path) -> str:
    """A whole text file, as ``read_text`` gives it (universal newlines), if it is UTF-8 text."""
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise BadFileError(path, f"a NUL byte at offset {nul} (a binary file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(path, f"invalid UTF-8 at byte offset {e.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _check_text(path: pathlib.Path) -> None:
    """Raise ``BadFileError`` unless the file is UTF-8 without NUL bytes (read in pieces: any size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise BadFileError(path, f"a NUL byte at offset {offset + nul} (a binary file?)")
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous piece
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise BadFileError(path, f"invalid UTF-8 at byte offset {offset - held + e.start}") from None
            if not chunk:
                return
            offset += len(chunk)


def _documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    """The documents of one file. A file that is not UTF-8 text raises ``BadFileError`` before the
    first document; a broken JSONL line raises ``DataError`` naming the line."""
    if path.suffix == ".jsonl":
        _check_text(path)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}:{e.pos + 1}: not valid JSON ({e.msg}); every line of a .jsonl "
                                    "file must be one JSON object") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{n}: a JSON {type(record).__name__}, not an object with a "
                                    f"{text_field!r} field")
                if text_field not in record:
                    raise DataError(f"{path}:{n} has no field {text_field!r}; pick the text field with --text-field")
                if record[text_field]:
                    yield str(record[text_field])
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ConfigError("reading .parquet needs pyarrow: pip install 'dmc[train]'") from e
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{path} has no column {text_field!r} (columns: {table.schema_arrow.names}); "
                            "pick it with --text-field")
        for batch in table.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if value:
                    yield str(value)
    else:
        text = _read_text(path)
        if text.strip():
            yield text


def read_documents(path: pathlib.Path, text_field: str, on_bad_file: str = "skip") -> Iterator[str]:
    """The documents of one file. A file that is not UTF-8 text yields nothing and warns
    (``on_bad_file="skip"``) or raises ``BadFileError`` (``"error"``)."""
    _check_on_bad_file(on_bad_file)
    try:
        yield from _documents(path, text_field)
    except BadFileError as e:
        if on_bad_file == "error":
            raise
        warnings.warn(f"skipped {e.path}: not UTF-8 text ({e.reason})", BadFileWarning, stacklevel=2)


def no_text_error(skipped: list[tuple[str, str]], total: int) -> DataError:
    """The error for data of which no file is UTF-8 text (each of ``skipped`` is (path, reason))."""
    return DataError(f"none of the {total} data files is UTF-8 text (e.g. {skipped[0][0]}: {skipped[0][1]})")


def skipped_line(skipped: list[tuple[str, str]], total: int) -> str:
    """One line for the files left out as not UTF-8 text: how many, and the first with why."""
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return (f"skipped {len(skipped)} of {total} data files that are not UTF-8 text ({skipped[0][0]}: "
            f"{skipped[0][1]}{more})")


def read_text_files(files: list[pathlib.Path], text_field: str = "text",
                    on_bad_file: str = "skip") -> tuple[list[str], list[tuple[str, str]]]:
    """Every document of ``files`` in file order, and (path, reason) of each file left out as not
    UTF-8 text (``on_bad_file="error"`` raises ``BadFileError`` at the first). Raises ``DataError``
    when no file is text: nothing to evaluate (checked before any model is loaded)."""
    _check_on_bad_file(on_bad_file)
    texts, skipped = [], []
    for path in files:
        try:
            texts.extend(_documents(pathlib.Path(path), text_field))
        except BadFileError as e:
            if on_bad_file == "error":
                raise
            skipped.append((e.path, e.reason))
    if files and len(skipped) == len(files):
        raise no_text_error(skipped, len(files))
    return texts, skipped


def report_skipped(skipped: list[tuple[str, str]], total: int) -> None:
    """One warning for the files left out as not UTF-8 text: how many, and the first few with why."""
    if not skipped:
        return
    lines = [f"  {path}: {reason}" for path, reason in skipped[:REPORT_PATHS]]
    if len(skipped) > REPORT_PATHS:
        lines.append(f"  ... and {len(skipped) - REPORT_PATHS} more")
    warnings.warn(f"skipped {len(skipped)} of {total} data files that are not UTF-8 text (binary, or another "
                  "encoding); --on-bad-file error refuses them instead:\n" + "\n".join(lines),
                  BadFileWarning, stacklevel=3)


def read_texts(sources: list[str], text_field: str = "text", on_bad_file: str = "skip") -> list[str]:
    """Every document of ``sources`` in file order (evaluation data); files that are not UTF-8 text
    are skipped with one report, or refused."""
    _check_on_bad_file(on_bad_file)
    files = discover_files(sources, "data")
    texts, skipped = read_text_files(files, text_field, on_bad_file)
    report_skipped(skipped, len(files))
    return texts


# ------------------------------------------------------------------------------ tokenizing
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids. The backend's truncation and padding are left out: the
    tokenizer's own calls switch them off, so they changed the hash after the first call. It costs a
    serialisation of the whole vocabulary (~0.1 s for 50k tokens): compute it once per corpus."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            from tokenizers import Tokenizer
            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.bos_token_id}-{tokenizer.eos_token_id}"
    if getattr(tokenizer, "split_special_tokens", False):
        extra += "-split"
    return hashlib.sha256((payload + extra).encode()).hexdigest()[:16]


def shard_key(path: pathlib.Path, text_field: str, fingerprint: str) -> str:
    """The cache key of one source file: its path, size and mtime, the text field and the tokenizer."""
    stat = path.stat()
    return hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{text_field}|{fingerprint}".encode()
                          ).hexdigest()[:24]


class Encoder:
    """Token ids of a list of documents, without special tokens, as ``tokenizer(doc,
    add_special_tokens=False)["input_ids"]`` gives them for each. A fast tokenizer whose call goes
    straight to its Rust backend is run through ``encode_batch_fast`` (all cores, no offsets);
    any other tokenizer is called once per document (the slow twin)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None and not self._plain_backend(tokenizer):
            self.backend = None

    @staticmethod
    def _plain_backend(tokenizer) -> bool:
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:
            return False
        cls, backend = type(tokenizer), tokenizer.backend_tokenizer
        return (isinstance(tokenizer, TokenizersBackend) and cls.__call__ is TokenizersBackend.__call__
                and cls._encode_plus is TokenizersBackend._encode_plus
                and backend.truncation is None and backend.padding is None)

    def __call__(self, docs: list[str]) -> list[list[int]]:
        if self.backend is None:
            return [self.tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
        # what the tokenizer's own call sets before it encodes
        self.backend.encode_special_tokens = getattr(self.tokenizer, "split_special_tokens", False)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(docs, add_special_tokens=False)]


@dataclass
class Shard:
    """One tokenized source file, memory-mapped."""

    tokens: np.ndarray  # uint32 [n_tokens]
    offsets: np.ndarray  # int64 [n_docs + 1]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def load(cls, shard_dir: pathlib.Path, offsets: np.ndarray | None = None) -> "Shard":
        offsets = np.load(shard_dir / "offsets.npy") if offsets is None else offsets
        tokens = (np.memmap(shard_dir / "tokens.bin", dtype=np.uint32, mode="r") if offsets[-1] > 0
                  else np.zeros(0, np.uint32))
        return cls(tokens=tokens, offsets=offsets)


def _publish(tmp: pathlib.Path, shard_dir: pathlib.Path) -> None:
    try:
        os.replace(tmp, shard_dir)
    except OSError:  # another process finished the same shard first
        shutil.rmtree(tmp, ignore_errors=True)


def _write_status(directory: pathlib.Path, source: pathlib.Path, bad: str | None, atomic: bool = True) -> None:
    """``status.json``: the source and why it is not text (None: it is); replaced atomically unless
    ``directory`` is a shard's temporary directory, which nobody reads yet."""
    status = json.dumps({"source": str(source), "bad": bad})
    if not atomic:
        (directory / "status.json").write_text(status)
        return
    tmp = directory / f".status.json.{os.getpid()}"
    tmp.write_text(status)
    os.replace(tmp, directory / "status.json")


def _cached(path: pathlib.Path, shard_dir: pathlib.Path) -> Shard | str | None:
    """The cached shard of ``path``, the reason it is not text, or None when it is not cached."""
    status_file = shard_dir / "status.json"
    if status_file.exists():
        bad = json.loads(status_file.read_text()).get("bad")
        if bad:
            return bad
    if not (shard_dir / "offsets.npy").exists():
        return None
    if not status_file.exists():  # a shard from before files were checked: check its source once
        bad = None
        if path.suffix != ".parquet":
            try:
                _check_text(path)
            except BadFileError as e:
                bad = e.reason
        try:
            _write_status(shard_dir, path, bad)
        except OSError:  # a read-only cache: check again next time
            pass
        if bad:
            return bad
    return Shard.load(shard_dir)


class _ShardWriter:
    """The shard of one file being written: token pieces held in memory (spilled to a temporary
    directory past SPILL_BYTES), published under the file's key once its last document is in."""

    def __init__(self, index: int, path: pathlib.Path, shard_dir: pathlib.Path, bos: int | None,
                 eos: int | None) -> None:
        self.index, self.path, self.shard_dir = index, path, shard_dir
        self.bos = np.asarray([] if bos is None else [bos], np.uint32)
        self.eos = np.asarray([] if eos is None else [eos], np.uint32)
        self.pieces: list[np.ndarray] = []
        self.held = 0  # tokens in self.pieces
        self.offsets = [0]
        self.tmp: pathlib.Path | None = None
        self.read = False  # every document of the file went to the encoder
        self.queued = 0  # documents of it in batches not yet written

    def add(self, ids: list[int]) -> None:
        n = len(ids) + len(self.bos) + len(self.eos)
        if n < 2:
            return
        self.pieces += [self.bos, np.asarray(ids, np.uint32), self.eos]
        self.offsets.append(self.offsets[-1] + n)
        self.held += n
        if self.held * 4 >= SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        if self.tmp is None:
            self.tmp = pathlib.Path(tempfile.mkdtemp(dir=self.shard_dir.parent, prefix=f".{self.shard_dir.name}."))
        with open(self.tmp / "tokens.bin", "ab") as f:
            if self.pieces:
                np.concatenate(self.pieces).tofile(f)
        self.pieces, self.held = [], 0

    def finish(self) -> Shard:
        self._spill()
        offsets = np.asarray(self.offsets, dtype=np.int64)
        np.save(self.tmp / "offsets.npy", offsets)
        _write_status(self.tmp, self.path, None, atomic=False)
        _publish(self.tmp, self.shard_dir)
        return Shard.load(self.shard_dir, offsets)

    def abandon(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _record_bad(path: pathlib.Path, shard_dir: pathlib.Path, reason: str) -> None:
    try:
        tmp = pathlib.Path(tempfile.mkdtemp(dir=shard_dir.parent, prefix=f".{shard_dir.name}."))
        _write_status(tmp, path, reason, atomic=False)
        _publish(tmp, shard_dir)
    except OSError:  # a read-only cache: found again next time
        pass


def _tokenize_missing(missing: list[tuple[int, pathlib.Path, pathlib.Path]], tokenizer, text_field: str,
                      on_bad_file: str, progress: bool) -> dict[int, Shard | str]:
    """Tokenize (index, path, shard_dir) jobs into the cache: the documents of many files go to one
    call of the encoder, a large file's over many. Each batch is encoded in a background thread (the
    Rust encoder releases the GIL) while the next is read. Returns each index's shard, or why the
    file is not text."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    encoder = Encoder(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sizes = [path.stat().st_size for _, path, _ in missing]
    bar = tqdm(total=sum(sizes), desc=f"tokenizing {len(missing)} file{'s' * (len(missing) > 1)}", unit="B",
               unit_scale=True, disable=not progress)
    done: dict[int, Shard | str] = {}
    writers: list[_ShardWriter] = []  # in file order, not yet published
    docs: list[str] = []  # the batch being gathered, and whose each document is
    owners: list[_ShardWriter] = []
    chars = read_bytes = 0
    in_flight = None  # (future ids, owners, bytes for the bar) of the batch being encoded

    def collect(batch) -> None:
        future, batch_owners, nbytes = batch
        for writer, ids in zip(batch_owners, future.result(), strict=True):
            writer.add(ids)
            writer.queued -= 1
        bar.update(nbytes)
        while writers and writers[0].read and not writers[0].queued:
            writer = writers.pop(0)
            done[writer.index] = writer.finish()

    def flush() -> None:
        nonlocal docs, owners, chars, read_bytes, in_flight
        previous, in_flight = in_flight, (pool.submit(encoder, docs), owners, read_bytes)
        docs, owners, chars, read_bytes = [], [], 0, 0
        if previous is not None:  # written while the batch just submitted is encoded
            collect(previous)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="dmc-encode") as pool:
            for (index, path, shard_dir), size in zip(missing, sizes):
                writer = _ShardWriter(index, path, shard_dir, bos, eos)
                writers.append(writer)
                seen = 0  # bytes of the file counted on the bar (characters, up to its size)
                try:
                    for doc in _documents(path, text_field):
                        docs.append(doc)
                        owners.append(writer)
                        writer.queued += 1
                        chars += len(doc)
                        step = min(len(doc), size - seen)
                        seen, read_bytes = seen + step, read_bytes + step
                        if chars >= BATCH_CHARS:
                            flush()
                except BadFileError as e:
                    writers.remove(writer)  # the check comes before the first document: none of it is batched
                    _record_bad(path, shard_dir, e.reason)
                    if on_bad_file == "error":
                        raise
                    done[index] = e.reason
                writer.read = True
                read_bytes += size - seen
            flush()
            batch, in_flight = in_flight, None
            collect(batch)
    finally:
        bar.close()
        for writer in writers:
            writer.abandon()
    return done


def tokenize_files(files: list[pathlib.Path], tokenizer, text_field: str, cache_dir: str | pathlib.Path,
                   on_bad_file: str = "skip", progress: bool = False) -> tuple[list[Shard], list[tuple[str, str]]]:
    """Tokenize the files that are not in the cache yet and memory-map every shard back.

    Returns the shards of the files that are UTF-8 text, in order, and (path, reason) for each file
    that is not (``on_bad_file="skip"``; ``"error"`` raises ``BadFileError`` at the first)."""
    _check_on_bad_file(on_bad_file)
    cache_dir = pathlib.Path(cache_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    results: list[Shard | str | None] = []
    missing = []
    for i, path in enumerate(files):
        shard_dir = cache_dir / shard_key(path, text_field, fingerprint)
        cached = _cached(path, shard_dir)
        if isinstance(cached, str) and on_bad_file == "error":
            raise BadFileError(path, cached)
        results.append(cached)
        if cached is None:
            missing.append((i, path, shard_dir))
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for i, result in _tokenize_missing(missing, tokenizer, text_field, on_bad_file, progress).items():
            results[i] = result
    skipped = [(str(files[i]), r) for i, r in enumerate(results) if isinstance(r, str)]
    return [r for r in results if isinstance(r, Shard)], skipped


def tokenize_file(path: pathlib.Path, tokenizer, text_field: str, cache_dir: pathlib.Path) -> Shard:
    """Tokenize one file into the cache (once) and memory-map it back; a file that is not UTF-8 text
    raises ``BadFileError``. For many files use ``tokenize_files`` (one fingerprint, batched)."""
    return tokenize_files([pathlib.Path(path)], tokenizer, text_field, cache_dir, on_bad_file="error")[0][0]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], -100 at each document's first token
    document_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L], restarting at 0 in every document

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.labels, self.document_ids, self.position_ids)))


class PackedData:
    """Train/held-out documents packed into fixed-length rows, addressed by a global row index."""

    def __init__(self, shards: list[Shard], seq_len: int, val_fraction: float, seed: int) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.skipped_files: list[tuple[str, str]] = []  # (path, reason): sources that are not UTF-8 text
        counts = np.asarray([shard.num_docs for shard in shards], dtype=np.int64)
        n_docs = int(counts.sum())
        if n_docs == 0:
            raise ConfigError("the training data tokenized to nothing (every document was empty)")
        shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), counts)
        doc_in_shard = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
        self.doc_table = np.stack([shard_of, doc_in_shard], axis=1)  # [n_docs, 2]: shard, doc
        lengths = np.concatenate([np.diff(shard.offsets).astype(np.int64) for shard in shards])
        order = np.random.default_rng(seed).permutation(n_docs)
        n_val = 0 if val_fraction == 0 or n_docs < 2 else max(1, round(val_fraction * n_docs))
        self.val_docs, self.train_docs = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.lengths = lengths
        self.rows_per_epoch = int(lengths[self.train_docs].sum()) // seq_len
        if self.rows_per_epoch == 0:
            raise ConfigError(f"the training data holds {int(lengths[self.train_docs].sum())} tokens, fewer than "
                              f"one row of seq_len={seq_len}; add data or lower --seq-len")
        self.val_rows = int(lengths[self.val_docs].sum()) // seq_len
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_sources(cls, sources: list[str], tokenizer, seq_len: int, val_fraction: float, seed: int,
                     text_field: str = "text", cache_dir: str | None = None, progress: bool = True,
                     on_bad_file: str = "skip") -> "PackedData":
        """Discover, tokenize (once: ``cache_dir``, default ``$DMC_TOKEN_CACHE`` or
        ``~/.cache/dmc/tokens``) and pack. Files that are not UTF-8 text are skipped with one warning
        naming them (``skipped_files`` lists them), or refused with ``on_bad_file="error"``."""
        files = discover_files(sources)
        cache = pathlib.Path(cache_dir or os.environ.get("DMC_TOKEN_CACHE", "~/.cache/dmc/tokens")).expanduser()
        shards, skipped = tokenize_files(files, tokenizer, text_field, cache, on_bad_file, progress)
        if not shards:
            raise no_text_error(skipped, len(files))
        report_skipped(skipped, len(files))
        data = cls(shards, seq_len, val_fraction, seed)
        data.skipped_files = skipped
        return data

    def _doc_tokens(self, doc: int) -> np.ndarray:
        s, d = self.doc_table[doc]
        shard = self.shards[s]
        return shard.tokens[shard.offsets[d]:shard.offsets[d + 1]]

    def _stream(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return docs, np.concatenate([[0], np.cumsum(self.lengths[docs])])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.train_docs)
            self._epoch_cache = (epoch, *self._stream(order))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _row(self, docs: np.ndarray, starts: np.ndarray, row: int):
        lo = row * self.seq_len
        ids = np.empty(self.seq_len, np.int64)
        doc_ids = np.empty(self.seq_len, np.int64)
        pos = np.empty(self.seq_len, np.int64)
        first_doc = int(np.searchsorted(starts, lo, side="right")) - 1
        filled, k = 0, first_doc
        while filled < self.seq_len:
            tokens = self._doc_tokens(docs[k])
            begin = lo + filled - starts[k]  # offset inside this document
            take = min(len(tokens) - begin, self.seq_len - filled)
            ids[filled:filled + take] = tokens[begin:begin + take]
            doc_ids[filled:filled + take] = k - first_doc
            pos[filled:filled + take] = np.arange(take)  # a document cut by the row edge restarts
            filled, k = filled + take, k + 1
        labels = ids.copy()
        labels[np.r_[True, doc_ids[1:] != doc_ids[:-1]]] = -100  # never predict across a boundary
        return ids, labels, doc_ids, pos

    def train_rows(self, indices: list[int]) -> Batch:
        rows = []
        for g in indices:
            docs, starts = self._epoch(g // self.rows_per_epoch)
            rows.append(self._row(docs, starts, g % self.rows_per_epoch))
        return _stack(rows)

    def val_batches(self, batch_size: int, max_batches: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Held-out rows in a fixed order, split evenly across ranks: every rank gets the same
        number of batches (sharded models run collectives in every forward)."""
        docs, starts = self._stream(self.val_docs)
        per_rank = min(self.val_rows // world, max_batches * batch_size)
        mine = list(range(rank * per_rank, (rank + 1) * per_rank))
        for i in range(0, len(mine), batch_size):
            yield _stack([self._row(docs, starts, r) for r in mine[i:i + batch_size]])


def _stack(rows) -> Batch:
    return Batch(*(torch.from_numpy(np.stack(parts)) for parts in zip(*rows)))
