"""Perplexity and recall measured token by token through a cache that changes what later tokens see.

:func:`dmc.eval.perplexity` reads every logit of a window from one forward pass. That is right for
full attention and for DMC (its compressed cache reproduces the full-sequence form exactly, spec
§7.3), but an eviction cache (H2O, TOVA: :class:`dmc.baselines.EvictionCache`) evicts *between*
steps: a parallel pass, or a prefill that is cut to the budget afterwards, lets every token see
the whole prefix and hides what eviction costs. Here tokens go through the cache as in decoding,
one per step, after a first chunk of ``prefill`` tokens. That chunk is exact for eviction as long
as it fits in the budget (nothing is evicted before the cache is full, and H2O's accumulated
scores and TOVA's last-query scores come out the same), so the default prefill is the budget.

For models of the DMC families: a DMC model, or ``dmc.convert(stock)`` in vanilla mode for the
eviction baselines. They place every token from the cache's count of real tokens, so left-padded
batches need no position ids.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from ..config import is_dmc
from ..stats import CompressionStats
from .perplexity import PerplexityAccumulator, PerplexityResult, window_batches
from .recall import check_probe, make_trial

CacheFactory = Callable[[int], object]  # context length in tokens -> a fresh, empty cache


def _check_model(model) -> None:
    if not is_dmc(model):
        raise ValueError("streaming evaluation needs a model of the DMC families (a DMC model, or "
                         "dmc.convert(stock) with set_dmc_mode(vanilla=True) for eviction): they position "
                         "tokens from the cache, which stock models do not")


def default_prefill(cache) -> int:
    """Tokens that may go through ``cache`` in one first chunk without changing any result: the
    eviction budget (nothing is evicted before the cache is full); 1 for other caches."""
    policy = getattr(cache, "policy", None)
    return int(getattr(policy, "budget", 1) or 1)


@torch.no_grad()
def stream(model, ids: torch.Tensor, cache, prefill: int = 1, attention_mask: torch.Tensor | None = None,
           on_logits: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Feed ``ids`` ``[B, L]`` through ``cache``: the first ``prefill`` columns in one forward, then
    one column per forward. ``attention_mask`` ``[B, L]`` marks real tokens (left padding only).

    Calls ``on_logits(start, logits)`` for every chunk (``logits``: ``[B, n, V]`` of columns
    ``start .. start + n - 1``) and returns the logits of the last column, ``[B, V]``.
    """
    _check_model(model)
    length, start, last = ids.shape[1], 0, None
    while start < length:
        end = min(length, start + (max(1, prefill) if start == 0 else 1))
        mask = None if attention_mask is None else attention_mask[:, :end]  # the model reads its last n columns
        logits = model(ids[:, start:end], attention_mask=mask, past_key_values=cache, use_cache=True).logits
        if on_logits is not None:
            on_logits(start, logits)
        last = logits[:, -1]
        start = end
    return last


@torch.no_grad()
def streaming_perplexity(model, tokenizer, texts, cache_factory: CacheFactory, seq_len: int = 1024,
                         max_windows: int | None = None, batch_size: int = 1, prefill: int | None = None,
                         progress: bool = False) -> PerplexityResult:
    """Perplexity over the same windows as :func:`dmc.eval.perplexity` (non-overlapping
    ``seq_len``-token windows of ``texts``), every prediction read from the cache's state at
    that step. ``cache_factory(seq_len)`` makes the cache of each batch; ``prefill`` defaults to
    :func:`default_prefill`. ``compression`` holds tokens and kept slots at the end of each window.
    """
    _check_model(model)
    device = next(model.parameters()).device
    acc = PerplexityAccumulator()
    for ids in window_batches(tokenizer, texts, seq_len, max_windows, batch_size, "perplexity (streamed)", progress):
        ids = ids.to(device)
        cache = cache_factory(seq_len)
        total = torch.zeros((), dtype=torch.float64, device=device)

        def score(start: int, logits: torch.Tensor) -> None:
            nonlocal total
            targets = ids[:, start + 1:start + 1 + logits.shape[1]]
            chunk = logits[:, :targets.shape[1]].float()
            total += torch.nn.functional.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), targets.reshape(-1),
                                                       reduction="sum").double()

        stream(model, ids, cache, prefill if prefill is not None else default_prefill(cache), on_logits=score)
        acc.add(float(total), ids, CompressionStats.from_cache(cache))
    return acc.result()


@torch.no_grad()
def streaming_recall_probe(model, tokenizer, cache_factory: CacheFactory, pairs: int = 20, trials: int = 20,
                           seed: int = 0, batch_size: int | None = None, prefill: int | None = None) -> dict:
    """:func:`dmc.eval.recall_probe` (same trials for the same seed, same scoring) with the prompt
    streamed through the cache, then greedy decoding through it.

    Trials run in left-padded batches of ``batch_size`` (default: all at once); each batch gets
    one cache, ``cache_factory(n)`` with n the batch's mean prompt length in tokens.
    """
    _check_model(model)
    check_probe(pairs, trials)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (all trials at once), got {batch_size!r}")
    rng = random.Random(seed)
    cases = [make_trial(rng, pairs) for _ in range(trials)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_size = batch_size or trials
    outputs, prompt_tokens, contexts = [], 0, []
    for first in range(0, trials, batch_size):
        chunk = cases[first:first + batch_size]
        prompts = [tokenizer(p, return_tensors="pt").input_ids[0] for p, _ in chunk]
        wants = [len(tokenizer(a, add_special_tokens=False).input_ids) for _, a in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
        ids, mask = ids.to(device), mask.to(device)
        context = round(sum(len(p) for p in prompts) / len(prompts))
        cache = cache_factory(context)
        token = stream(model, ids, cache, prefill if prefill is not None else default_prefill(cache),
                       attention_mask=mask).argmax(-1)
        generated = [token]
        for _ in range(max(wants) - 1):
            mask = torch.cat([mask, mask.new_ones(len(chunk), 1)], dim=1)
            token = model(token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            token = token.argmax(-1)
            generated.append(token)
        generated = torch.stack(generated, dim=1).cpu()
        for row, want in zip(generated.tolist(), wants):
            row = row[:want]
            if tokenizer.eos_token_id in row:  # generate() stops there and pads the rest
                row = row[:row.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
        prompt_tokens += sum(len(p) for p in prompts)
        contexts.append(context)
    correct = sum(out.strip() == answer.strip() for out, (_, answer) in zip(outputs, cases))
    return {"accuracy": correct / trials, "trials": trials, "pairs": pairs,
            "mean_prompt_tokens": prompt_tokens / trials, "cache_contexts": contexts, "outputs": outputs}


__all__ = ["default_prefill", "stream", "streaming_perplexity", "streaming_recall_probe"]
