"""Log-probabilities on the device: the chosen token's and the k most likely, for a whole step in one host copy.

They are read from the logits the sampler is given, i.e. the model's own distribution (``log_softmax`` of its
logits, before temperature, top-k or top-p), as OpenAI and vLLM return by default. A prompt's log-probs
(``prompt_logprobs``, the completions API's ``echo``) come from the prefill forward's logits of every prompt
token; the first token has none (nothing predicts it).
"""

from __future__ import annotations

import torch

from .params import TokenLogprob


def pack(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """The log-prob of ``chosen[i]`` under ``logits[i]`` and the ``k`` most likely tokens, as one float64 tensor
    ``[N, 2 + 2k]``: chosen id, its log-prob, then k ids and k log-probs, most likely first. float64 holds the
    ids exactly, so the whole step's log-probs (and the sampled tokens) reach the host in one copy."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    parts = [chosen[:, None].double(), logprobs.gather(-1, chosen[:, None]).double()]
    if k:
        top, ids = logprobs.topk(k, dim=-1)
        parts += [ids.double(), top.double()]
    return torch.cat(parts, dim=-1)


def unpack(row: list[float], k: int, width: int) -> TokenLogprob:
    """One row of :func:`pack` (``.tolist()``, packed with ``width`` top tokens) as a :class:`TokenLogprob`
    keeping the first ``k`` of them."""
    top = [(int(row[2 + j]), row[2 + width + j]) for j in range(k)]
    return TokenLogprob(int(row[0]), row[1], top)
