"""The README and docs/ as a reader meets them: the README stays a short front door, every link
resolves, nothing under docs/ is left unlinked, and what the docs promise about the code holds."""

from __future__ import annotations

import pathlib
import re
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def _pages() -> list[pathlib.Path]:
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted((ROOT / "experiments").rglob("*.md"))]
    return [p for p in pages if p.exists()]


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (lower case, punctuation dropped, spaces to -)."""
    heads = [line.lstrip("#").strip().lower() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h).replace(" ", "-") for h in heads}


def _links(page: pathlib.Path):
    """(target path, anchor) of every relative link of ``page`` outside code blocks."""
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        yield (page.parent / urllib.parse.unquote(path)).resolve() if path else page, anchor, target


def test_readme_is_a_short_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    for needed in ("make demo", "make test", "dmc import-gguf", "dmc retrofit", "dmc.LLM", "dmc serve", "## Results"):
        assert needed in text, needed
    assert not re.search(r"round [0-9]|[Ii]ssue #?[0-9]+|stop [0-9]+", text)


def test_every_link_resolves():
    broken = []
    for page in _pages():
        if "real_serve" in page.parts:  # the serving run's own report
            continue
        for dest, anchor, target in _links(page):
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_nothing_under_docs_is_unlinked_and_docs_stay_small():
    linked = set()
    for page in _pages():
        for dest, _, _ in _links(page):
            linked.add(dest)
            if dest.is_dir():
                linked.update(p.resolve() for p in dest.rglob("*"))
    files = [p for p in (ROOT / "docs").rglob("*") if p.is_file()]
    assert len(files) < 60
    unlinked = sorted(str(p.relative_to(ROOT)) for p in files if p.resolve() not in linked)
    assert not unlinked, unlinked


def test_readme_says_the_engine_samples_by_default_and_shows_greedy():
    import dmc
    assert dmc.SamplingParams().temperature == 1.0  # what the README says; `dmc generate` is greedy
    text = (ROOT / "README.md").read_text()
    first = next(block for block in FENCE.findall(text) if "dmc.LLM(" in block)
    assert "temperature=0" in first
    assert "`dmc.SamplingParams()` samples at temperature 1.0 by default, while `dmc generate` is greedy" in \
        " ".join(text.split())


def test_serving_docs_show_lm_eval_over_http_and_in_process():
    command = re.compile(r"dmc-lm-eval --model dmc --model_args pretrained=\S+ --tasks \S+")
    over_http = re.compile(r"--model local-completions .*model_args.*tokenizer_backend=huggingface,tokenizer=\S+")
    for name in ("serve.md", "lm_eval.md"):
        text = " ".join((ROOT / "docs" / name).read_text().split())
        assert "multiple-choice" in text and "echo" in text, name
        assert command.search(text) and over_http.search(text), name
