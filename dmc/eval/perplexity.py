"""Held-out perplexity in the two modes of a DMC model.

``mode="full"`` runs the full-sequence forward (spec §3, no cache); ``mode="cache"`` prefills a
DMC cache and reads the logits of that pass, so the numbers come from the compressed state. For a
DMC model the two agree (spec §7.3); their gap is a correctness check, not a quality measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import is_dmc as dmc_model
from ..stats import CompressionStats


@dataclass
class PerplexityResult:
    loss: float  # mean next-token cross-entropy (nats)
    tokens: int  # predicted tokens
    windows: int
    compression: CompressionStats | None  # from the caches (mode="cache" on a DMC model)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


class PerplexityAccumulator:
    """Sums of a perplexity over batches of windows: summed NLL (nats), predicted tokens, windows,
    and the compression of each batch (concatenated over the batch dimension)."""

    def __init__(self) -> None:
        self.nll, self.predicted, self.windows = 0.0, 0, 0
        self._tokens: list[torch.Tensor] = []
        self._slots: list[torch.Tensor] = []

    def add(self, nll: float, ids: torch.Tensor, stats: CompressionStats | None = None) -> None:
        """One batch of windows ``ids`` ``[B, seq_len]`` whose predictions summed to ``nll``."""
        self.nll += float(nll)
        self.predicted += ids[:, 1:].numel()
        self.windows += len(ids)
        if stats is not None:
            self._tokens.append(stats.tokens.cpu())
            self._slots.append(stats.slots.cpu())

    def result(self) -> PerplexityResult:
        compression = (CompressionStats(tokens=torch.cat(self._tokens, dim=1), slots=torch.cat(self._slots, dim=1))
                       if self._tokens else None)
        return PerplexityResult(loss=self.nll / self.predicted, tokens=self.predicted, windows=self.windows,
                                compression=compression)


def token_windows(tokenizer, texts, seq_len: int, max_windows: int | None = None):
    """Non-overlapping windows of ``seq_len`` tokens over each text (tails shorter than that are
    dropped), at most ``max_windows`` in all."""
    count = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            yield ids[start:start + seq_len]
            count += 1
            if max_windows is not None and count >= max_windows:
                return


def check_windows(seq_len: int, max_windows: int | None, batch_size: int) -> None:
    """ValueError for window settings that cannot give a perplexity."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a token and the one it predicts), got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be an integer >= 1 or None (all), got {max_windows!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def window_batches(tokenizer, texts, seq_len: int, max_windows: int | None, batch_size: int, desc: str,
                   progress: bool):
    """:func:`token_windows` stacked into batches ``[<= batch_size, seq_len]``, with a progress bar.
    Raises ValueError when no text holds ``seq_len`` tokens."""
    from tqdm.auto import tqdm

    check_windows(seq_len, max_windows, batch_size)
    batch: list[torch.Tensor] = []
    seen = 0
    for window in tqdm(token_windows(tokenizer, texts, seq_len, max_windows), desc=desc, unit="window",
                       disable=not progress):
        batch.append(window)
        seen += 1
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)
    if seen == 0:
        raise ValueError(f"no text holds {seq_len} tokens: lower seq_len or give more text")


@torch.no_grad()
def perplexity(model, tokenizer, texts, seq_len: int = 1024, mode: str = "full", max_windows: int | None = None,
               batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` over ``texts`` (an iterable of strings).

    Args:
        mode: "full" (no cache), "cache" (through the model's compressed cache) or "relaxed" (the
            training-mode forward: relaxed decisions with logistic noise from a fixed seed, as the
            retrofit sees them; its gap to "full" is what hard decisions cost at inference). The
            last two are for DMC models only.
    """
    if mode not in ("full", "cache", "relaxed"):
        raise ValueError(f"mode must be 'full', 'cache' or 'relaxed', got {mode!r}")
    is_dmc = dmc_model(model)
    if mode != "full" and not is_dmc:
        raise ValueError(f"mode={mode!r} measures a DMC model's compression; this is a plain model")
    device = next(model.parameters()).device
    # relaxed: the same noise for every call (a fixed seed), so results repeat
    extra = {"dmc_generator": torch.Generator(device).manual_seed(0)} if mode == "relaxed" else {}
    was_training = model.training
    model.train(mode == "relaxed")
    try:
        acc = PerplexityAccumulator()
        for ids in window_batches(tokenizer, texts, seq_len, max_windows, batch_size, f"perplexity ({mode})",
                                  progress):
            ids = ids.to(device)
            out = model(ids, use_cache=mode == "cache", **extra)
            logits = out.logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            stats = None
            if is_dmc:
                stats = (CompressionStats.from_cache(out.past_key_values) if mode == "cache" else out.compression)
            acc.add(float(nll), ids, stats)
    finally:
        model.train(was_training)
    return acc.result()
