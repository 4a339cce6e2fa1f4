"""Training data: discover files, tokenize once into memory-mapped shards, pack into rows.

- Sources: text files (one document each), JSONL (one document per line, a named field) and
  Parquet (a named column), given as files, directories (searched recursively) or globs.
- Each source file becomes a cached shard: ``tokens.bin`` (uint32) and ``offsets.npy`` (document
  boundaries), keyed by the file's path, size, mtime and the tokenizer, so a corpus is tokenized
  once and read back with ``np.memmap``.
- Documents are split into train and held-out sets; train documents are shuffled per epoch
  (seeded), concatenated and cut into rows of ``seq_len``. Each row carries ``document_ids`` and
  per-document ``position_ids`` (no merging or attention across documents), and its labels
  skip the first token of every document.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs", ".tex",
                 ".html", ".css", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".sh", ""}
DATA_SUFFIXES = {".jsonl", ".parquet"}


def discover_files(sources: list[str]) -> list[pathlib.Path]:
    """Expand files, directories (recursively) and globs into a sorted list of data files."""
    found: set[pathlib.Path] = set()
    for source in sources:
        matches = [pathlib.Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        if not matches:
            raise ConfigError(f"training data {source!r} does not exist (no file, directory or glob match)")
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
        raise ConfigError(f"training data {sources} holds no non-empty files")
    return files


def read_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    """The documents of one file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ConfigError(f"{path}:{n} has no field {text_field!r}; pick the text field with --text-field")
                if record[text_field]:
                    yield str(record[text_field])
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ConfigError("reading .parquet needs pyarrow: pip install 'dmc[train]'") from e
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ConfigError(f"{path} has no column {text_field!r} (columns: {table.column_names}); "
                              "pick it with --text-field")
        for value in table.column(text_field).to_pylist():
            if value:
                yield str(value)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.bos_token_id}-{tokenizer.eos_token_id}"
    return hashlib.sha256((payload + extra).encode()).hexdigest()[:16]


@dataclass
class Shard:
    """One tokenized source file, memory-mapped."""

    tokens: np.ndarray  # uint32 [n_tokens]
    offsets: np.ndarray  # int64 [n_docs + 1]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


def tokenize_file(path: pathlib.Path, tokenizer, text_field: str, cache_dir: pathlib.Path) -> Shard:
    """Tokenize one file into the cache (once) and memory-map it back."""
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{text_field}|"
                         f"{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:24]
    shard_dir = cache_dir / key
    if not (shard_dir / "offsets.npy").exists():
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pieces, offsets = [], [0]
        for doc in read_documents(path, text_field):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            ids = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
            if len(ids) < 2:
                continue
            pieces.append(np.asarray(ids, dtype=np.uint32))
            offsets.append(offsets[-1] + len(ids))
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}."))
        (np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)).tofile(tmp / "tokens.bin")
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        (tmp / "source.txt").write_text(str(path))
        try:
            os.replace(tmp, shard_dir)
        except OSError:  # another process finished the same shard first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    offsets = np.load(shard_dir / "offsets.npy")
    tokens = (np.memmap(shard_dir / "tokens.bin", dtype=np.uint32, mode="r") if offsets[-1] > 0
              else np.zeros(0, np.uint32))
    return Shard(tokens=tokens, offsets=offsets)


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
        docs = [(s, d) for s, shard in enumerate(shards) for d in range(shard.num_docs)]
        if not docs:
            raise ConfigError("the training data tokenized to nothing (every document was empty)")
        self.doc_table = np.asarray(docs, dtype=np.int64)  # [n_docs, 2]: shard, doc
        lengths = np.asarray([shards[s].offsets[d + 1] - shards[s].offsets[d] for s, d in docs], dtype=np.int64)
        order = np.random.default_rng(seed).permutation(len(docs))
        n_val = 0 if val_fraction == 0 or len(docs) < 2 else max(1, round(val_fraction * len(docs)))
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
                     text_field: str = "text", cache_dir: str | None = None, progress: bool = True) -> "PackedData":
        from tqdm.auto import tqdm
        files = discover_files(sources)
        cache = pathlib.Path(cache_dir or os.environ.get("DMC_TOKEN_CACHE", "~/.cache/dmc/tokens")).expanduser()
        shards = [tokenize_file(f, tokenizer, text_field, cache)
                  for f in tqdm(files, desc="tokenizing", unit="file", disable=not progress or len(files) < 2)]
        return cls(shards, seq_len, val_fraction, seed)

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
