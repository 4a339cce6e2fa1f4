"""Sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Randomness is a counter-based hash of (request seed, token index, rank), so a seeded request
draws the same tokens whatever else shares its batch, and nothing needs a host-side generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK24 = (1 << 24) - 1


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors ``[B]``."""

    temperature: torch.Tensor  # fp32, 0 = greedy
    top_k: torch.Tensor  # int64, 0 = all
    top_p: torch.Tensor  # fp32
    seed: torch.Tensor  # int64
    step: torch.Tensor  # int64: index of the token being drawn
    all_greedy: bool

    @classmethod
    def build(cls, params: list, seeds: list[int], steps: list[int], device) -> "SamplingBatch":
        """The settings of these rows on ``device``, in two host-to-device copies that do not wait for the
        GPU (:func:`to_device`): the decode step builds them before it launches the model."""
        ints = to_device([[p.top_k for p in params], seeds, steps], torch.int64, device)
        floats = to_device([[p.temperature for p in params], [p.top_p for p in params]], torch.float32, device)
        return cls(temperature=floats[0], top_k=ints[0], top_p=floats[1], seed=ints[1], step=ints[2],
                   all_greedy=all(p.greedy for p in params))


def to_device(rows: list[list], dtype: torch.dtype, device) -> torch.Tensor:
    """Equal-length host lists as one ``[len(rows), n]`` tensor on ``device``. On CUDA through pinned memory
    with a non-blocking copy: a plain ``torch.tensor(..., device=...)`` from pageable memory synchronises the
    stream, so the host would wait for every kernel queued before it (the caching host allocator keeps a
    pinned block until its copy is done, so the buffer is never overwritten early)."""
    return host_to_device(torch.tensor(rows, dtype=dtype), device)


def host_to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``, on CUDA through pinned memory with a non-blocking copy (:func:`to_device`)."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _uniform(seed: torch.Tensor, step: torch.Tensor, width: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``[B, width]`` from a splitmix-style hash of (seed, step, column)."""
    col = torch.arange(width, device=seed.device, dtype=torch.int64)
    x = seed[:, None] * 0x2545F4914F6CDD1D + step[:, None] * 0x1B873593 + col[None, :] * 0x5851F42D
    for shift, mult in ((31, 0x7FB5D329728EA185), (27, 0x5F356495), (33, 0x1CE4E5B9)):
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * mult
    return (((x >> 20) & _MASK24).float() + 0.5) / float(1 << 24)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``[B, V]``; returns int64 ``[B]``."""
    greedy = logits.argmax(-1)
    if batch.all_greedy:
        return greedy
    logits = logits.float()
    temperature = batch.temperature.clamp_min(1e-5)[:, None]
    sorted_logits, order = torch.sort(logits / temperature, dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    top_k = torch.where(batch.top_k > 0, batch.top_k, vocab)[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    drop = (rank >= top_k) | ((before >= batch.top_p[:, None]) & (rank > 0))
    gumbel = -torch.log(-torch.log(_uniform(batch.seed, batch.step, vocab)))
    choice = (sorted_logits.masked_fill(drop, float("-inf")) + gumbel).argmax(-1)
    sampled = order.gather(-1, choice[:, None])[:, 0]
    return torch.where(batch.temperature > 0, sampled, greedy)
