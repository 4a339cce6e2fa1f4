"""Tokenization speed of the training data pipeline (dmc.train.data): a cold run into an empty
token cache, then a second run with the same tokenizer and data (cache hits), in files/s and
tokens/s, with the CPU time of the process (all threads). The last line hashes the packed rows,
so two versions of the pipeline can be checked for bit-identical output.

    python benchmarks/tokenization.py --tokenizer DIR [--data DIR ...] [--module path/to/data.py] [--cold-only]

``--module`` loads another version of dmc/train/data.py (e.g. an older commit's, written out with
``git show COMMIT:dmc/train/data.py > /tmp/data_old.py``) in place of the installed one.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pathlib
import sysconfig
import tempfile
import time

import transformers


def load_module(path: str | None):
    if path is None:
        from dmc.train import data
        return data
    spec = importlib.util.spec_from_file_location("dmc.train._benchmarked_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a directory AutoTokenizer loads")
    parser.add_argument("--data", nargs="+", default=[str(site / "sympy"), str(site / "pandas")])
    parser.add_argument("--module", help="a dmc/train/data.py to measure instead of the installed one")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--cold-only", action="store_true", help="skip the second (cache hit) run")
    args = parser.parse_args()
    data_module = load_module(args.module)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    files = data_module.discover_files(args.data)
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size / 1e6:.1f} MB; {os.cpu_count()} CPU cores; load average "
          f"{os.getloadavg()[0]:.1f}; module {args.module or data_module.__file__}")
    with tempfile.TemporaryDirectory() as cache:
        for run in ("cold",) if args.cold_only else ("cold", "warm"):
            wall, cpu = time.perf_counter(), time.process_time()
            packed = data_module.PackedData.from_sources(args.data, tokenizer, args.seq_len, 0.01, 0,
                                                         cache_dir=cache, progress=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            tokens = sum(len(shard.tokens) for shard in packed.shards)
            print(f"{run}: {wall:.1f} s (CPU {cpu:.1f} s), {len(files) / wall:.1f} files/s, "
                  f"{tokens / wall:,.0f} tokens/s, {tokens:,} tokens in {len(packed.shards)} shards", flush=True)
    digest = hashlib.sha256()
    for start in range(0, packed.rows_per_epoch, 256):
        rows = packed.train_rows(list(range(start, min(start + 256, packed.rows_per_epoch))))
        digest.update(rows.input_ids.numpy().tobytes())
    print(f"rows: {packed.rows_per_epoch} of {args.seq_len} tokens, sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
