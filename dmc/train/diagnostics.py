"""Per-head diagnostics of a DMC run, gathered on the held-out batches of every evaluation.

A recipe can meet its global CR while heads collapse: some to CR 1 (never merge), others to one
slot per sequence (merge everything), with decision logits parked at a constant that the training
noise turns into the right *average* rate but inference's threshold does not. These numbers show it:
the realized CR of every (layer, KV head) with hard decisions and its histogram, and statistics of
the decision logits ``a`` (mean, spread, share of tokens within ±1 of the threshold).
"""

from __future__ import annotations

import math

import torch

from .distributed import Runtime, all_reduce_sum

# Histogram edges of per-head CR; the last bin is open.
CR_BINS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)


def cr_histogram(head_cr: list[float]) -> dict[str, int]:
    """Counts of heads per CR bin, keyed like "2-3" and ">=64"."""
    counts = {}
    for lo, hi in zip(CR_BINS, CR_BINS[1:] + (math.inf,)):
        key = f">={lo:g}" if hi == math.inf else f"{lo:g}-{hi:g}"
        counts[key] = sum(1 for cr in head_cr if lo <= cr < hi)
    return counts


class HeadDiagnostics:
    """Sums over evaluation batches; :meth:`summary` all-reduces them across ranks."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # [6, layers, H]: tokens, slots, n, Σa, Σa², near

    def add(self, out) -> None:
        stats = out.compression
        tokens, slots = stats.tokens.sum(1), stats.slots.sum(1)  # [layers, H]
        parts = [tokens, slots]
        logits = getattr(out, "decision_logits", None)
        if logits is not None:  # [B, layers, H, L]
            a = logits.double()
            parts += [torch.full_like(tokens, a.shape[0] * a.shape[-1]), a.sum((0, 3)), (a * a).sum((0, 3)),
                      (a.abs() < 1).double().sum((0, 3))]
        else:
            parts += [torch.zeros_like(tokens)] * 4
        batch = torch.stack([p.double() for p in parts])
        self.sums = batch if self.sums is None else self.sums + batch

    def summary(self, runtime: Runtime) -> dict:
        if self.sums is None:
            return {}
        tokens, slots, n, total, squares, near = all_reduce_sum(self.sums, runtime)
        head_cr = (tokens / slots.clamp_min(1e-12)).flatten().tolist()
        values = {
            "head_cr": [round(x, 3) for x in head_cr],
            "head_cr_hist": cr_histogram(head_cr),
            "head_cr_min": round(min(head_cr), 4),
            "head_cr_max": round(max(head_cr), 4),
        }
        if float(n.sum()) > 0:
            mean = total / n.clamp_min(1)
            std = (squares / n.clamp_min(1) - mean * mean).clamp_min(0).sqrt()
            values.update({
                "logit_mean": [round(x, 3) for x in mean.flatten().tolist()],
                "logit_std": [round(x, 3) for x in std.flatten().tolist()],
                "logit_near_threshold": float(near.sum() / n.sum()),
            })
        return values


def format_summary(values: dict, target_cr: float) -> str:
    """The end-of-run report: target vs realized CR, the relaxation gap and the head histogram."""
    lines = [f"target CR {target_cr:g}, realized on held-out rows (hard decisions) {values.get('val_cr', float('nan')):.3f}"]
    if "relaxation_gap" in values:
        lines.append(f"relaxed-vs-hard loss gap {values['relaxation_gap']:+.4f} nats "
                     f"(hard {values['val_loss']:.4f}, relaxed {values['val_loss_relaxed']:.4f})")
    if "head_cr_hist" in values:
        hist = ", ".join(f"{k}: {v}" for k, v in values["head_cr_hist"].items() if v)
        lines.append(f"per-head CR: min {values['head_cr_min']:.2f}, max {values['head_cr_max']:.2f}; "
                     f"heads per CR bin: {hist}")
    if "logit_near_threshold" in values:
        lines.append(f"decision logits within ±1 of the threshold: {100 * values['logit_near_threshold']:.1f}% of tokens")
    return "\n".join(lines)
