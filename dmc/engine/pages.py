"""The page arithmetic of prefill: the one "does it fit" check of the engine's page pool.

A head holding ``n`` slots has pages up to the ready one, ``n // P + 1``; a chunk of ``tokens`` more slots adds
at most ``ceil(tokens / P)`` pages whatever ``n`` is, and every (layer, KV head) of the sequence may take them if
nothing merges. The scheduler plans with :func:`chunk_pages`; the cache and the runner check the pool with
:func:`ensure_room` before a forward allocates on the device (where it could not stop).
"""

from __future__ import annotations

import math


class OutOfPages(RuntimeError):
    """The pool cannot hold what a prefill chunk needs (the scheduler preempts or waits)."""


def chunk_pages(rows: int, page_size: int, tokens: int) -> int:
    """Pages a prefill chunk of ``tokens`` may take if nothing merges, over the ``rows`` (layer, KV head)
    pairs of one sequence."""
    return rows * math.ceil(tokens / page_size)


def ensure_room(free: int, rows: int, page_size: int, sizes: list[int]) -> None:
    """Raise OutOfPages unless chunks of ``sizes`` tokens (one forward's) fit ``free`` pages even if nothing
    merges."""
    need = sum(chunk_pages(rows, page_size, n) for n in sizes)
    if free < need:
        what = f"a prefill chunk of {sizes[0]} tokens" if len(sizes) == 1 else (
            f"a prefill batch of {sum(sizes)} tokens ({len(sizes)} chunks)")
        raise OutOfPages(f"{what} may need {need} pages, {free} free")
