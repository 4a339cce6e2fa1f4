"""Shared by the benchmark scripts: write one named section of a Markdown report in place, and a run's files."""

from __future__ import annotations

import json
import pathlib


def write_section(path: str | pathlib.Path, name: str, text: str, title: str = "# Benchmarks") -> None:
    """Replace (or append) the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    path = pathlib.Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else title + "\n\nEvery section is written by the script it names.\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


def write_results(out: str | pathlib.Path, name: str, rows: list[dict], **meta) -> dict:
    """Write ``out/results/<name>.json`` with the rows and the run's GPU and library versions."""
    import torch
    import transformers

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": transformers.__version__, **meta}
    path = pathlib.Path(out) / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return meta


def write_report(out: str | pathlib.Path, name: str, meta: dict, rows: list[dict], markdown: str) -> None:
    """Write ``out/<name>.json`` (meta and rows) and ``out/<name>.md`` (the rendered report), then print it."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
