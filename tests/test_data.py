"""The data pipeline (dmc.train.data): batched tokenization equals the per-document path, the token
cache hits on a second run, files that are not UTF-8 text are skipped or refused, JSONL errors
name the file and line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import warnings

import numpy as np
import pytest
import torch
import transformers

from dmc.tiny import train_tokenizer
from dmc.train import ConfigError
from dmc.train import data as D
from dmc.train.data import (BadFileError, BadFileWarning, DataError, Encoder, PackedData, Shard, discover_files,
                            read_documents, read_texts)

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
CORPUS_DIRS = [STDLIB / "json", STDLIB / "email"]
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2 style) with BOS/EOS, trained on stdlib source and saved."""
    texts = [p.read_text() for d in CORPUS_DIRS for p in sorted(d.glob("*.py"))]
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=400).save_pretrained(path)
    return path


@pytest.fixture
def tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text files, JSONL and edge cases: CRLF and lone CR newlines, a BOM, non-ASCII, a literal
    special token, empty documents, an extensionless text file."""
    root = tmp_path_factory.mktemp("corpus")
    for d in CORPUS_DIRS:
        shutil.copytree(d, root / d.name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "crlf.txt").write_bytes(b"line one\r\nline two\rline three\r\n\xef\xbb\xbfbom inside\n")
    (root / "unicode.md").write_text("caf\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f600 <s> not a special token?</s>\n")
    (root / "README").write_text("an extensionless text file is read like any other\n" * 20)
    (root / "blank.txt").write_text("   \n\n")
    records = [{"text": f"record {i}: " + "x = y + 1\n" * (i % 7)} for i in range(300)]
    records[5]["text"] = ""
    records[6]["text"] = "<s>"
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "   ")
    (root / "many.jsonl").write_text("\n".join(lines) + "\n")
    return root


def sequential_shards(files, tokenizer, text_field="text") -> list[Shard]:
    """The path before batching: each document read as before (``read_text``) and tokenized on
    its own through the tokenizer's call."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    shards = []
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            docs = [str(r[text_field]) for r in records if r[text_field]]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            docs = [text] if text.strip() else []
        pieces, offsets = [], [0]
        for doc in docs:
            ids = [bos] + tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
            pieces.append(np.asarray(ids, np.uint32))
            offsets.append(offsets[-1] + len(ids))
        shards.append(Shard(np.concatenate(pieces) if pieces else np.zeros(0, np.uint32),
                            np.asarray(offsets, np.int64)))
    return shards


def all_rows(data: PackedData) -> list[np.ndarray]:
    train = data.train_rows(list(range(2 * data.rows_per_epoch)))  # two epochs: two shuffles
    val = list(data.val_batches(4, 1000))
    return [train.input_ids.numpy(), train.labels.numpy(), train.document_ids.numpy(), train.position_ids.numpy()] + \
        [b.input_ids.numpy() for b in val]


# ------------------------------------------------------------------------------ batched = sequential
@pytest.mark.parametrize("batch_chars,spill_bytes", [(D.BATCH_CHARS, D.SPILL_BYTES), (3000, 4096)])
def test_batched_tokenization_gives_the_rows_of_the_sequential_path(corpus, tokenizer, tmp_path, monkeypatch,
                                                                    batch_chars, spill_bytes):
    # small batches and spills: files split over several encoder calls, many files in one call,
    # shards written to disk in pieces
    monkeypatch.setattr(D, "BATCH_CHARS", batch_chars)
    monkeypatch.setattr(D, "SPILL_BYTES", spill_bytes)
    files = discover_files([str(corpus)])
    assert {"README", "crlf.txt", "many.jsonl"} <= {f.name for f in files}
    assert Encoder(tokenizer).backend is not None  # the fast path is the one under test
    data = PackedData.from_sources([str(corpus)], tokenizer, 64, 0.05, 3, cache_dir=str(tmp_path), progress=False)
    reference = PackedData(sequential_shards(files, tokenizer), 64, 0.05, 3)
    assert len(data.shards) == len(files) and not data.skipped_files
    for ours, theirs in zip(data.shards, reference.shards):
        assert np.array_equal(ours.offsets, theirs.offsets) and np.array_equal(ours.tokens, theirs.tokens)
    # the document table as it was built before (one Python tuple per document)
    docs = [(s, d) for s, shard in enumerate(reference.shards) for d in range(shard.num_docs)]
    assert np.array_equal(data.doc_table, np.asarray(docs, dtype=np.int64))
    assert np.array_equal(data.lengths, [reference.shards[s].offsets[d + 1] - reference.shards[s].offsets[d]
                                         for s, d in docs])
    for ours, theirs in zip(all_rows(data), all_rows(reference), strict=True):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("setting", ["plain", "split_special_tokens", "truncation"])
def test_encoder_equals_the_tokenizer_call(tokenizer, setting):
    docs = ["def f(x):\n    return x  # caf\u00e9", "", "<s> and </s> inside", "\u65e5\u672c " * 50, "a\r\nb"]
    if setting == "split_special_tokens":
        tokenizer.split_special_tokens = True
    if setting == "truncation":  # a tokenizer.json with truncation on: the per-document path is taken
        tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    encoder = Encoder(tokenizer)
    assert (encoder.backend is None) == (setting == "truncation")
    expected = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    assert encoder(docs) == expected
    if setting == "split_special_tokens":
        assert expected[2] != tokenizer("<s> and </s> inside", add_special_tokens=False,
                                        split_special_tokens=False)["input_ids"]


def test_a_tokenizer_without_a_rust_backend_takes_the_per_document_path(tokenizer):
    class Slow:  # the attributes the pipeline reads from a tokenizer that has no backend_tokenizer
        bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens):
            return tokenizer(text, add_special_tokens=add_special_tokens)

    docs = ["x = 1\n", "import os"]
    assert Encoder(Slow())(docs) == Encoder(tokenizer)(docs)


# ------------------------------------------------------------------------------ the token cache
SECOND_RUN = """
import sys, numpy as np, transformers
from dmc.train import data as D
def fail(*a, **k):
    raise AssertionError("tokenized again: the cache missed")
D.Encoder.__call__ = fail
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
type(tok).__call__ = fail
data = D.PackedData.from_sources([sys.argv[2]], tok, 64, 0.05, 3, cache_dir=sys.argv[3], progress=False)
np.save(sys.argv[4], data.train_rows(list(range(data.rows_per_epoch))).input_ids.numpy())
"""


def test_second_run_reads_the_cache(corpus, tokenizer_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    fingerprints = []
    real = D.tokenizer_fingerprint
    monkeypatch.setattr(D, "tokenizer_fingerprint", lambda tok: fingerprints.append(1) or real(tok))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    first = PackedData.from_sources([str(corpus)], tokenizer, 64, 0.05, 3, cache_dir=str(cache), progress=False)
    # the tokenizer is serialised and hashed once per corpus, not once per file (that made a cache
    # hit cost as much as tokenizing: ~0.1 s a file for a 50k vocabulary)
    assert len(fingerprints) == 1 and len(first.shards) > 20
    entries = sorted(os.listdir(cache))
    # a second run: another process, the tokenizer loaded again, other hash seeds; encoding fails there
    out = tmp_path / "rows.npy"
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SECOND_RUN, str(tokenizer_dir), str(corpus), str(cache), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.array_equal(np.load(out), first.train_rows(list(range(first.rows_per_epoch))).input_ids.numpy())
    assert sorted(os.listdir(cache)) == entries  # nothing new written


def test_cache_key_ignores_truncation_and_padding_state(tokenizer):
    before = D.tokenizer_fingerprint(tokenizer)
    tokenizer(["a", "bb"], padding=True, truncation=True, max_length=4)  # leaves both set on the backend
    assert D.tokenizer_fingerprint(tokenizer) == before
    tokenizer.split_special_tokens = True  # this one changes the ids
    assert D.tokenizer_fingerprint(tokenizer) != before


def test_progress_bar_for_a_single_large_file(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "BATCH_CHARS", 5000)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"doc {i} " + "word " * 50}) + "\n" for i in range(400)))
    PackedData.from_sources([str(big)], tokenizer, 64, 0.0, 0, cache_dir=str(tmp_path / "c"), progress=True)
    err = capsys.readouterr().err
    assert "tokenizing 1 file" in err and "100%" in err


# ------------------------------------------------------------------------------ files that are not text
def bad_corpus(root: pathlib.Path) -> dict[str, str]:
    """Good files and files that are not UTF-8 text; returns name -> what the reason must say."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "good.py").write_text("print('hello')\n" * 50)
    (root / "good.jsonl").write_text(json.dumps({"text": "a fine record " * 20}) + "\n")
    ls = pathlib.Path("/bin/ls")
    binary = ls.read_bytes()[:20000] if ls.is_file() else b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 10
    (root / "ls").write_bytes(binary)  # a copy of an executable, no extension
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (root / "nul.py").write_bytes(b"x = 1\n\x00\n")
    (root / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (root / "cut.md").write_bytes("ends inside a character \u2014".encode()[:-1])
    return {"ls": "NUL byte", "latin1.txt": "invalid UTF-8 at byte offset 3", "nul.py": "NUL byte at offset 6",
            "bad.jsonl": "invalid UTF-8 at byte offset 25", "cut.md": "invalid UTF-8 at byte offset 24"}


def test_files_that_are_not_text_are_skipped_and_reported(tokenizer, tmp_path):
    expected = bad_corpus(tmp_path / "data")
    with pytest.warns(BadFileWarning) as caught:
        data = PackedData.from_sources([str(tmp_path / "data")], tokenizer, 16, 0.0, 0,
                                       cache_dir=str(tmp_path / "cache"), progress=False)
    message = str(caught[0].message)
    assert message.startswith("skipped 5 of 7 data files that are not UTF-8 text")
    skipped = {pathlib.Path(p).name: reason for p, reason in data.skipped_files}
    assert skipped.keys() == expected.keys()
    for name, reason in expected.items():
        assert reason in skipped[name] and f"{name}: {skipped[name]}" in message
    good = sequential_shards([tmp_path / "data" / "good.jsonl", tmp_path / "data" / "good.py"], tokenizer)
    assert [s.tokens.tolist() for s in data.shards] == [s.tokens.tolist() for s in good]
    # the second run knows them from the cache without reading them, and says so again
    read = []
    real = D._documents
    D_documents = lambda path, field: read.append(path.name) or real(path, field)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp, pytest.warns(BadFileWarning, match="skipped 5 of 7"):
        mp.setattr(D, "_documents", D_documents)
        again = PackedData.from_sources([str(tmp_path / "data")], tokenizer, 16, 0.0, 0,
                                        cache_dir=str(tmp_path / "cache"), progress=False)
    assert not read and again.skipped_files == data.skipped_files
    # and refuses them when asked to, cached or not
    for cache in ("cache", "fresh"):
        with pytest.raises(BadFileError) as info:
            PackedData.from_sources([str(tmp_path / "data")], tokenizer, 16, 0.0, 0,
                                    cache_dir=str(tmp_path / cache), progress=False, on_bad_file="error")
        assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)
        assert "\n" not in str(info.value) and info.value.path.endswith(sorted(expected)[0])


def test_the_report_names_ten_files_and_counts_the_rest(tokenizer, tmp_path):
    (tmp_path / "ok.txt").write_text("some text " * 30)
    for i in range(13):
        (tmp_path / f"blob{i:02d}").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.warns(BadFileWarning) as caught:
        PackedData.from_sources([str(tmp_path)], tokenizer, 8, 0.0, 0, cache_dir=str(tmp_path / ".c"), progress=False)
    message = str(caught[0].message)
    assert "skipped 13 of 14" in message and "blob09" in message and "blob10" not in message
    assert message.endswith("... and 3 more")


def test_nothing_but_bad_files_is_a_one_line_error(tokenizer, tmp_path):
    (tmp_path / "blob").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"none of the 1 data files is UTF-8 text \(e\.g\. .*blob: a NUL byte"):
        PackedData.from_sources([str(tmp_path)], tokenizer, 8, 0.0, 0, cache_dir=str(tmp_path / ".c"), progress=False)


def test_shards_cached_before_the_check_are_checked_once(tokenizer, tmp_path):
    """A cache written before files were checked holds shards of binary files: they are found."""
    bad_corpus(tmp_path / "data")
    files = discover_files([str(tmp_path / "data")])
    cache = tmp_path / "cache"
    fingerprint = D.tokenizer_fingerprint(tokenizer)
    for path in files:  # the layout old versions wrote: no status.json
        shard_dir = cache / D.shard_key(path, "text", fingerprint)
        shard_dir.mkdir(parents=True)
        np.asarray([1, 5, 2], np.uint32).tofile(shard_dir / "tokens.bin")
        np.save(shard_dir / "offsets.npy", np.asarray([0, 3], np.int64))
    with pytest.warns(BadFileWarning, match="skipped 5 of 7"):
        data = PackedData.from_sources([str(tmp_path / "data")], tokenizer, 2, 0.0, 0, cache_dir=str(cache),
                                       progress=False)
    assert [s.tokens.tolist() for s in data.shards] == [[1, 5, 2]] * 2  # the good ones were not re-tokenized
    assert all((cache / D.shard_key(p, "text", fingerprint) / "status.json").exists() for p in files)


def test_read_documents_and_read_texts_skip_or_refuse(tmp_path):
    bad_corpus(tmp_path)
    with pytest.warns(BadFileWarning, match="skipped .*latin1.txt: not UTF-8 text"):
        assert list(read_documents(tmp_path / "latin1.txt", "text")) == []
    with pytest.raises(BadFileError, match="latin1.txt is not UTF-8 text: invalid UTF-8 at byte offset 3"):
        list(read_documents(tmp_path / "latin1.txt", "text", on_bad_file="error"))
    with pytest.warns(BadFileWarning, match="skipped 5 of 7"):
        texts = read_texts([str(tmp_path)])
    assert texts == ["a fine record " * 20, "print('hello')\n" * 50]
    with pytest.raises(ConfigError, match="on_bad_file must be one of skip, error"):
        read_texts([str(tmp_path)], on_bad_file="replace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_texts([str(tmp_path / "good.py")]) == ["print('hello')\n" * 50]


# ------------------------------------------------------------------------------ JSONL errors
@pytest.mark.parametrize("line,message", [
    ('{"text": "no closing brace"', r"bad\.jsonl:3:29: not valid JSON \(Expecting ',' delimiter\)"),
    ('["a list"]', r"bad\.jsonl:3: a JSON list, not an object with a 'text' field"),
    ('{"body": "no text field"}', r"bad\.jsonl:3 has no field 'text'; pick the text field with --text-field"),
])
def test_broken_jsonl_lines_name_the_file_and_line(tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + '\n{"text": "after"}\n')
    with pytest.raises(DataError, match=message) as info:
        list(read_documents(path, "text"))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(DataError, match=message):
        PackedData.from_sources([str(path)], tokenizer, 8, 0.0, 0, cache_dir=str(tmp_path / "c"), progress=False)
    assert not [p for p in (tmp_path / "c").iterdir()]  # no shard or temporary left behind


def test_bad_on_bad_file_value(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("text " * 20)
    with pytest.raises(ConfigError, match="on_bad_file must be one of"):
        PackedData.from_sources([str(tmp_path)], tokenizer, 8, 0.0, 0, cache_dir=str(tmp_path / "c"),
                                progress=False, on_bad_file="ignore")


# ------------------------------------------------------------------------------ packing rows
def _synthetic_data(lengths, seq_len=16, val_fraction=0.0, seed=0):
    docs = [np.arange(1, n + 1, dtype=np.uint32) + 1000 * i for i, n in enumerate(lengths)]
    shard = Shard(tokens=np.concatenate(docs), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return PackedData([shard], seq_len, val_fraction, seed), docs


def test_packing_never_crosses_documents():
    data, docs = _synthetic_data([5, 23, 2, 40, 7, 11, 3, 30], seq_len=16)
    batch = data.train_rows(list(range(2 * data.rows_per_epoch)))  # two epochs
    for ids, labels, doc_ids, pos in zip(batch.input_ids, batch.labels, batch.document_ids, batch.position_ids):
        for seg in doc_ids.unique():
            where = (doc_ids == seg).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous
            tokens = ids[where]
            source = int(tokens[0]) // 1000
            assert torch.all(tokens // 1000 == source)  # one source document
            assert torch.all(tokens[1:] - tokens[:-1] == 1)  # an unbroken slice of it
            assert torch.equal(pos[where], torch.arange(len(where)))  # positions restart
            assert labels[where[0]] == -100 and torch.equal(labels[where[1:]], tokens[1:])
    epoch0 = batch.input_ids[:data.rows_per_epoch]
    epoch1 = batch.input_ids[data.rows_per_epoch:]
    assert not torch.equal(epoch0, epoch1)  # reshuffled per epoch
    again, _ = _synthetic_data([5, 23, 2, 40, 7, 11, 3, 30], seq_len=16)
    assert torch.equal(again.train_rows([0, 5, 9]).input_ids, data.train_rows([0, 5, 9]).input_ids)  # seeded


def test_held_out_split_is_disjoint_and_whole_documents():
    data, _ = _synthetic_data([30] * 40, seq_len=16, val_fraction=0.1)
    assert len(data.val_docs) == 4 and not set(data.val_docs) & set(data.train_docs)
    val_tokens = torch.cat([b.input_ids.flatten() for b in data.val_batches(2, 100)])
    assert set((val_tokens // 1000).tolist()) <= set(data.val_docs.tolist())
    per_rank = [[b.input_ids.shape[0] for b in data.val_batches(2, 100, rank, 3)] for rank in range(3)]
    assert per_rank[0] == per_rank[1] == per_rank[2] and sum(per_rank[0]) == data.val_rows // 3
    train_tokens = data.train_rows(list(range(data.rows_per_epoch))).input_ids
    assert not set((train_tokens // 1000).flatten().tolist()) & set(data.val_docs.tolist())


def test_jsonl_parquet_and_text_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    (tmp_path / "b.txt").write_text("a whole file is one document")
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["p1", "p2", None]}), tmp_path / "c.parquet")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("skipped")
    files = discover_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.jsonl", "b.txt", "c.parquet"]
    assert list(read_documents(files[0], "text")) == ["first doc", "second doc"]
    assert list(read_documents(files[2], "body")) == ["p1", "p2"]
    with pytest.raises(ConfigError, match="no field 'body'"):
        list(read_documents(files[0], "body"))
    with pytest.raises(ConfigError, match="does not exist"):
        discover_files([str(tmp_path / "missing")])
