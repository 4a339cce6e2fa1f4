"""Where an engine's steps spend their wall time, by section, summed over steps (two clock reads a section).

The sections that run the model (``prefill``, ``decode``) end with the host reading the sampled tokens, so
they include the GPU's time; the others are host work: ``schedule`` (admission, chunks, forks, the decode batch and
its page check: ``Scheduler.schedule``), ``postprocess`` (``Scheduler.update_from_output`` after sampling: appending
tokens, detokenization, stop checks, finishing requests). A server adds
its own sections (commands, outputs) to the same timer."""

from __future__ import annotations

import time
from collections import defaultdict


class StepTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    def add(self, section: str, since: float) -> float:
        """Count the time from ``since`` (a ``time.perf_counter()`` reading) to now in ``section``; returns now."""
        now = time.perf_counter()
        self.seconds[section] += now - since
        return now

    def summary(self) -> dict:
        """Steps counted, and milliseconds per step by section (and in all)."""
        steps = max(self.steps, 1)
        per_step = {name: round(s / steps * 1e3, 4) for name, s in sorted(self.seconds.items())}
        return {"steps": self.steps, "ms_per_step": per_step,
                "total_ms_per_step": round(sum(self.seconds.values()) / steps * 1e3, 4)}
