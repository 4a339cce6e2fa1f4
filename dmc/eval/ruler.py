"""RULER-style long-context tasks (Hsieh et al. 2024), generated on the fly from local text.

Four tasks, each a prompt of exactly ``length`` tokens: a haystack of the given texts (or, without
texts, a repeated filler sentence) with "needles" inserted from ``depth`` (0: the start of the
haystack, 1: its end) on, then a question; the answer is read greedily and scored by exact match.

- ``niah_single``: one needle "the special magic number for KEY is: VALUE"; retrieve VALUE.
- ``niah_multikey``: ``needles`` such lines with distinct keys; retrieve the value of one of them.
- ``niah_multivalue``: ``needles`` lines with the same key and different values; retrieve them all.
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = A``, ... (and a distractor chain of
  another value); list every variable equal to the first chain's value.

Prompts are built from token ids (the pieces tokenized apart and joined), so the length is exact and
every trial of a (task, length, depth) has the same length: they batch without padding. Scoring: the
first word of the generation must be the value (one answer), or the first ``n`` words must be the
``n`` answers in any order (several answers): RULER's answers are whole numbers or names, so no
partial credit is given.

:func:`ruler_eval` runs trials through the model's own cache (``model.generate``: DMC's compressed
cache, or full attention for a plain model) or, given a ``cache_factory``, through that cache as
:mod:`dmc.eval.streaming` does (eviction baselines: by default the prompt goes in after a first
chunk of the budget, token by token, so eviction acts on every prompt token).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n")
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"


@dataclass
class RulerTrial:
    task: str
    length: int  # prompt tokens
    depth: float  # where the needles start in the haystack, 0 to 1
    input_ids: list[int]
    answers: list[str]  # the expected words (one for single-value tasks)
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # token spans of the needles


def check_ruler(tasks, lengths, depths, trials: int) -> None:
    """ValueError for settings that cannot give an accuracy."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if not tasks or not lengths or not depths:
        raise ValueError("give at least one task, one length and one depth")
    if any(not isinstance(n, int) or n < 64 for n in lengths):
        raise ValueError(f"RULER lengths must be integers >= 64 tokens, got {list(lengths)}")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"RULER depths must be within 0 (start) and 1 (end), got {list(depths)}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")


def haystack_ids(tokenizer, texts: list[str] | None, length: int) -> list[int]:
    """At least ``length`` tokens of the texts one after another (repeated if they are short), or of
    the filler sentence without texts."""
    sources = [t for t in (texts or []) if t.strip()] or [FILLER * 8]
    ids: list[int] = []
    while len(ids) < length:
        for text in sources:
            ids += tokenizer(text + "\n", add_special_tokens=False).input_ids
            if len(ids) >= length:
                break
    return ids


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _word(rng: random.Random, n: int = 6, letters: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    return "".join(rng.choice(letters) for _ in range(n))


def _needles(task: str, rng: random.Random, needles: int) -> tuple[str, list[str], str, list[str]]:
    """(intro, needle lines, question, answers) of one trial."""
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        count = 1 if task == "niah_single" else needles
        keys = [_word(rng)] * count if task == "niah_multivalue" else list(dict.fromkeys(
            _word(rng) for _ in range(4 * count)))[:count]
        values = list(dict.fromkeys(_number(rng) for _ in range(4 * count)))[:count]
        lines = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        if task == "niah_multivalue":
            question = (f"What are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                        f"The special magic numbers for {keys[0]} mentioned in the provided text are:")
            return NIAH_INTRO, lines, question, values
        target = rng.randrange(count)
        question = (f"What is the special magic number for {keys[target]} mentioned in the provided text? "
                    f"The special magic number for {keys[target]} mentioned in the provided text is:")
        order = list(range(count))
        order.remove(target)  # the asked needle goes first (at the depth), the others after it
        return NIAH_INTRO, [lines[i] for i in [target, *order]], question, [values[target]]
    names = list(dict.fromkeys(_word(rng, 5, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(8 * needles)))
    value, other = _number(rng, 5), _number(rng, 5)
    chain, decoy = names[:needles], names[needles:2 * needles]
    lines = []
    for names_, first in ((chain, value), (decoy, other)):
        lines += [f"VAR {names_[0]} = {first}."] + [f"VAR {b} = {a}." for a, b in zip(names_, names_[1:])]
    lines = [x for pair in zip(lines[:needles], lines[needles:]) for x in pair]  # interleaved, each chain in order
    question = (f"Question: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {needles} variables are "
                f"assigned the value {value}, they are:")
    return VT_INTRO, lines, question, chain


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS, or none), as a prompt starts."""
    full, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    return full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []


def make_ruler_trial(tokenizer, task: str, length: int, depth: float, rng: random.Random,
                     haystack: list[int], needles: int = 4) -> RulerTrial:
    """One trial of exactly ``length`` tokens: intro, the haystack with the needle lines from ``depth``
    on (spread evenly over the rest of it, in order), question. ValueError when ``length`` has no room
    for a haystack."""
    intro, lines, question, answers = _needles(task, rng, needles)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    head, tail = _special_prefix(tokenizer) + encode(intro), encode("\n" + question)
    pieces = [encode("\n" + line + "\n") for line in lines]
    room = length - len(head) - len(tail) - sum(map(len, pieces))
    if room < len(pieces):
        raise ValueError(f"a {task} prompt of {length} tokens has no room for its haystack: give a longer length")
    start = rng.randrange(0, max(1, len(haystack) - room))
    hay = haystack[start:start + room]
    if len(hay) < room:
        hay = (hay + haystack)[:room]
    first = round(depth * room)
    cuts = [first + round(i * (room - first) / len(pieces)) for i in range(len(pieces))]
    ids, spans, at = list(head), [], 0
    for cut, piece in zip(cuts, pieces):
        ids += hay[at:cut]
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
        at = cut
    ids += hay[at:] + tail
    assert len(ids) == length
    return RulerTrial(task, length, depth, ids, answers, spans)


def make_ruler_trials(tokenizer, texts: list[str] | None, tasks=TASKS, lengths=(4096,), depths=(0.5,),
                      trials: int = 4, needles: int = 4, seed: int = 0) -> list[RulerTrial]:
    """``trials`` trials of every (task, length, depth), the same for the same seed."""
    check_ruler(tasks, lengths, depths, trials)
    rng = random.Random(seed)
    out = []
    for length in lengths:
        haystack = haystack_ids(tokenizer, texts, length * 2)
        for task in tasks:
            for depth in depths:
                out += [make_ruler_trial(tokenizer, task, length, depth, rng, haystack, needles)
                        for _ in range(trials)]
    return out


def score(output: str, answers: list[str]) -> bool:
    """Exact match: the first word of ``output`` is the answer, or its first ``len(answers)`` words
    are the answers in any order (words: runs of letters and digits)."""
    words = re.findall(r"[A-Za-z0-9]+", output)[:len(answers)]
    return sorted(words) == sorted(answers)


def _answer_tokens(tokenizer, answers: list[str]) -> int:
    """Tokens to generate: the answers, comma-separated, and a little slack."""
    return len(tokenizer(" " + ", ".join(answers), add_special_tokens=False).input_ids) + 4


@torch.no_grad()
def _generate(model, tokenizer, ids: torch.Tensor, new_tokens: int, cache_factory, prefill):
    """Greedy continuations ``[B][<= new_tokens]`` of the equal-length prompts ``ids`` ``[B, L]`` (cut
    at EOS), and the cache they were read through (None for a plain model's own)."""
    from ..config import is_dmc
    from ..hf.cache import DMCCache
    from .streaming import default_prefill, stream

    eos = tokenizer.eos_token_id
    if cache_factory is None:
        cache = DMCCache(model.config) if is_dmc(model) else None  # DMC: kept, to count what it holds
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        rows = out[:, ids.shape[1]:].tolist()
    else:
        cache = cache_factory(ids.shape[1])
        token = stream(model, ids, cache, default_prefill(cache) if prefill is None else prefill).argmax(-1)
        generated = [token]
        for _ in range(new_tokens - 1):
            token = model(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
            generated.append(token)
        rows = torch.stack(generated, dim=1).tolist()
    return [row[:row.index(eos)] if eos in row else row for row in rows], cache


@torch.no_grad()
def ruler_eval(model, tokenizer, trials: list[RulerTrial], cache_factory: Callable[[int], object] | None = None,
               prefill: int | None = None, batch_size: int = 4) -> dict:
    """Accuracy per task, length and depth, and overall, with the realized compression per length.

    Args:
        cache_factory: context length -> an empty cache (the eviction baselines, on a model of the DMC
            families in vanilla mode); None: the model's own cache through ``model.generate`` (DMC's
            compressed cache, full attention for a plain model).
        prefill: with a ``cache_factory``, the prompt tokens of the first forward (default: the
            eviction budget, :func:`dmc.eval.streaming.default_prefill`; the prompt length prefills it
            in one forward and compresses after, as SnapKV is published).

    Returns ``{"accuracy", "trials", "by_task": {task: {length: {depth: accuracy}}}, "compression":
    {length: CompressionStats summary} (caches that count slots), "outputs"}``.
    """
    from ..stats import CompressionStats

    device = next(model.parameters()).device
    groups: dict[tuple, list[RulerTrial]] = {}
    for trial in trials:
        groups.setdefault((trial.task, trial.length, trial.depth), []).append(trial)
    results, outputs, counted = {}, [], {}
    for (task, length, depth), group in groups.items():
        correct = 0
        for first in range(0, len(group), batch_size):
            batch = group[first:first + batch_size]
            ids = torch.tensor([t.input_ids for t in batch], device=device)
            new_tokens = max(_answer_tokens(tokenizer, t.answers) for t in batch)
            rows, cache = _generate(model, tokenizer, ids, new_tokens, cache_factory, prefill)
            if cache is not None:
                stats = CompressionStats.from_cache(cache)
                tokens, slots = counted.get(length, (0.0, 0.0))
                counted[length] = (tokens + float(stats.tokens.sum()), slots + float(stats.slots.sum()))
            for trial, row in zip(batch, rows):
                text = tokenizer.decode(row, skip_special_tokens=True)
                ok = score(text, trial.answers)
                correct += ok
                outputs.append({"task": task, "length": length, "depth": depth, "output": text,
                                "answers": trial.answers, "correct": ok})
        results.setdefault(task, {}).setdefault(str(length), {})[f"{depth:g}"] = correct / len(group)
    compression = {str(n): {"cr": tokens / slots, "tokens": tokens, "slots": slots}
                   for n, (tokens, slots) in counted.items() if slots > 0}
    return {"accuracy": sum(o["correct"] for o in outputs) / len(outputs), "trials": len(outputs),
            "by_task": results, "compression": compression, "outputs": outputs}


__all__ = ["TASKS", "RulerTrial", "check_ruler", "make_ruler_trial", "make_ruler_trials", "ruler_eval", "score"]
