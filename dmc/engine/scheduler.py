"""Continuous batching: the request lifecycle (waiting → running → finished), admission and
preemption.

The scheduler owns every request's status and the cache rows they hold: ``add`` queues a request,
``admit`` hands out the next one that fits, ``preempt`` gives a running request's pages back and
queues it first again, ``finish``/``abort`` end it. An engine step goes one way:
:meth:`Scheduler.schedule` plans a pass (a :class:`SchedulerOutput`: rows opened, preemptions made),
the runner executes it (:meth:`dmc.engine.runner.ModelRunner.execute`, a :class:`ModelOutput`), and
:meth:`Scheduler.update_from_output` applies the result: the one place request state changes after the
model ran (tokens seen and generated, text, stops, finishing, the CR estimate).

Admission uses the compression *observed* so far (a running mean of tokens per slot, divided
by a safety margin), never worst-case CR 1 memory: that is where DMC's batch-size gain comes
from. When compression turns out worse than estimated, the newest running request is preempted
(its pages freed) and later recomputed from its prompt plus what it already generated.

With prefix caching (:mod:`dmc.engine.prefix_cache`) the scheduler also keeps snapshots of prefilled prefixes in
rows no request runs; they give their rows and pages back before any request waits or is preempted for them.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..stats import CompressionStats
from .cache import OutOfPages, PagedKVCache
from .detokenizer import Detokenizer
from .params import SamplingParams, TokenLogprob
from .policy import CachePolicy, NoEviction
from .prefix_cache import PrefixCache, Snapshot
from .sampling import to_device

OUT_OF_MEMORY_PREFILL = ("this request needs more KV-cache memory than the engine has; lower max_tokens (--max-tokens) "
                         "or max_model_len (--max-model-len), or give the cache more memory (kv_cache_memory, "
                         "--kv-cache-memory-gib)")
OUT_OF_MEMORY_DECODING = ("out of KV-cache memory while decoding a single sequence; lower max_tokens (--max-tokens) "
                          "or max_model_len (--max-model-len), or give the cache more memory (kv_cache_memory, "
                          "--kv-cache-memory-gib)")


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted: it will be prefilled again)
    RUNNING = "running"  # holds a cache row: prefilled, decoding
    FINISHED = "finished"  # ended; ``finish_reason`` says why (stop, length, aborted, error)


@dataclass
class Request:
    """One request's state inside the engine."""

    id: int
    prompt: str | list[int]
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    row: int | None = None  # sequence row of the cache while running
    seen: int = 0  # tokens in the cache
    prefilling: bool = False  # running, its prompt (to_feed()) not all in the cache yet
    park_at: int = 0  # prefix caching: once this many fed tokens are in the cache, its row is copied (0: never)
    finish_reason: str | None = None
    error: str | None = None
    compression: dict | None = None
    preemptions: int = 0
    text: str = ""  # the output's text so far (cut before a stop string), when the engine has a tokenizer
    detokenizer: Detokenizer | None = None  # keeps ``text`` up to date a few tokens at a time
    streamed_tokens: int = 0
    streamed_chars: int = 0
    arrival: float = 0.0  # time.monotonic() when it was queued (the prefill delay counts from it)
    logprobs: list | None = None  # a TokenLogprob per output token, when params.logprobs is set
    prompt_logprobs: list | None = None  # [None, one per later prompt token], when params.prompt_logprobs is set

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def stable_text_length(self) -> int:
        """How much of ``text`` can no longer change (the rest could still begin a stop string)."""
        if self.detokenizer is None:
            return len(self.text)
        return self.detokenizer.stable_length(self.finished)

    @property
    def total_tokens(self) -> int:
        """Tokens the cache will have seen when the request ends at max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    def to_feed(self) -> list[int]:
        """What a (re)admitted request prefills: its prompt and everything it generated."""
        return self.prompt_ids + self.output_ids

    def unscored(self, size: int) -> range:
        """The positions of the next ``size`` fed tokens whose logits give a prompt log-prob not yet computed
        (position p predicts prompt token p + 1; a recomputed prompt keeps the log-probs it already has)."""
        if self.prompt_logprobs is None:
            return range(0)
        return range(max(self.seen, len(self.prompt_logprobs) - 1), min(self.seen + size, len(self.prompt_ids) - 1))

    @property
    def prefill_left(self) -> int:
        """Tokens of its feed a prefilling request has not fed yet (0 once decoding)."""
        return len(self.to_feed()) - self.seen if self.prefilling else 0


@dataclass
class SchedulerOutput:
    """One pass of an engine step: what the runner runs, and what :meth:`Scheduler.update_from_output` applies.

    A step is a few passes, each scheduled once the one before has been applied, because each depends on what
    the one before left: a prefill forward (``chunks``); with eviction further forwards, one chunk each, since
    a chunk's pages are known only once the chunk before has been cut to the budget (a batch would hold every
    chunk's pages at once, uncut); after a forward that completed a prompt or scores prompt positions, its
    sampling pass (``draws`` from the forward's ``logits``), which also starts the forks of the completed
    prompts, if the pages the forward left allow it; last the decode step (``decode``), whose batch takes in the
    requests prefilled this step and whose worst case sees the pages the prefill took. ``failed`` requests (out
    of memory: starved) end in the update with their error.
    """

    chunks: list[tuple[Request, int]] = field(default_factory=list)  # a prefill forward: (request, tokens)
    at: list[int] | None = None  # packed token indices whose logits the forward returns (None: chunks' last)
    scored: list[tuple[Request, range]] = field(default_factory=list)  # prompt positions scored (prompt_logprobs)
    draws: list[tuple[Request, int]] = field(default_factory=list)  # a sampling pass: (request, row of logits)
    logits: torch.Tensor | None = None  # the forward's logits the sampling pass reads
    score_row: int = 0  # row of ``logits`` of the first scored position (after the chunks' last tokens)
    prefilled: list[Request] = field(default_factory=list)  # requests whose prompt the forward completed, forks
    forks: list[tuple[Request, Request]] = field(default_factory=list)  # (fork, parent) started from a row copy
    started: float = 0.0  # time.perf_counter() at the start of the forward a sampling pass follows
    decode: list[Request] = field(default_factory=list)  # the decode step's batch
    failed: list[tuple[Request, str]] = field(default_factory=list)  # (request, error)

    @property
    def kind(self) -> str:
        """"prefill" (a forward), "sample" (its sampling pass), "decode", or "none" (only failures)."""
        if self.chunks:
            return "prefill"
        if self.logits is not None:
            return "sample"
        return "decode" if self.decode else "none"


@dataclass
class ModelOutput:
    """What the runner produced for one :class:`SchedulerOutput`."""

    logits: torch.Tensor | None = None  # a prefill forward's, on the device (its sampling pass draws from them)
    tokens: list[int] = field(default_factory=list)  # one per draw, or per decoding request
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # beside tokens, for requests that ask
    scores: list[TokenLogprob | None] = field(default_factory=list)  # the scored prompt positions', in order
    started: float = 0.0  # time.perf_counter() when the forward began


@dataclass
class _Step:
    """Where the engine step in progress stands (:meth:`Scheduler.begin_step`)."""

    budget: int  # prefill tokens left to the step
    decode: bool  # a decode pass ends the step
    prefill: bool = True  # another prefill forward may run
    forward: tuple[SchedulerOutput, ModelOutput, list[int]] | None = None  # a forward whose sampling is due


def scored_positions(chunks: list[tuple[Request, int]]) -> tuple[list[int] | None, list[tuple[Request, range]]]:
    """``(at, scored)``: the indices of the batch's packed tokens whose logits the prefill returns (each chunk's
    last, then the positions to score), None when nothing is scored (the fast path); ``scored`` pairs each
    request that scores with its positions."""
    ends = list(itertools.accumulate(size for _, size in chunks))
    at, scored = [end - 1 for end in ends], []
    for (request, size), end in zip(chunks, ends):
        positions = request.unscored(size)
        if positions:
            base = end - size - request.seen  # packed index of the request's position 0 in this chunk
            at += [base + p for p in positions]
            scored.append((request, positions))
    return (at if scored else None), scored


class CompressionEstimate:
    """Running estimate of tokens per slot, used to size admissions."""

    def __init__(self, prior: float, margin: float) -> None:
        self.tokens = 0.0
        self.slots = 0.0
        self.prior = max(prior, 1.0)
        self.margin = margin

    def observe(self, tokens: float, slots: float) -> None:
        self.tokens += tokens
        self.slots += slots

    @property
    def ratio(self) -> float:
        """Observed CR (the prior until something was observed), divided by 1 + margin, >= 1."""
        observed = self.tokens / self.slots if self.slots else self.prior
        return max(1.0, observed / (1.0 + self.margin))


class Scheduler:
    """The waiting and running queues, the requests' status, and the page budget arithmetic over
    one :class:`PagedKVCache` (whose rows it opens and closes)."""

    def __init__(self, cache: PagedKVCache, max_num_seqs: int, estimate: CompressionEstimate,
                 policy: CachePolicy | None = None, prefill_chunk: int = 0, whole_prompts: bool = False,
                 prefill_delay_factor: float = 0.0, max_num_batched_tokens: int | None = None,
                 eos_token_ids: set[int] | frozenset[int] = frozenset()) -> None:
        layout = cache.layout
        self.cache = cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.rows = layout.rows  # (layer, KV head) pairs of one sequence
        self.page_size = layout.page_size
        self.max_num_seqs = max_num_seqs
        self.estimate = estimate
        # Eviction baselines: a head never keeps more than slot_cap slots after a prefill chunk or a
        # decode step, but a chunk (prefill_chunk tokens at most) is held whole until it is cut.
        self.policy = NoEviction() if policy is None else policy
        self.slot_cap = self.policy.slot_cap
        self.prefill_chunk = prefill_chunk
        self.whole_prompts = whole_prompts  # a prompt that fits prefill_chunk is never split (_first_chunk_size)
        # New prompts wait up to this many times the last prefill forward's time, so that one forward takes several
        # (admission_due); the engine sets last_prefill_seconds after each prefill forward.
        self.prefill_delay_factor = prefill_delay_factor
        self.last_prefill_seconds = 0.0
        # No sequence ever holds more (max_model_len slots and the ready page): admission never asks
        # for more than this, so the smallest pool the engine accepts runs the longest prompt.
        self.max_pages = layout.rows * layout.pages_per_head
        self.max_num_batched_tokens = max_num_batched_tokens  # a step's tokens, decode first (step_budget)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = layout.max_model_len
        self.forks: dict[int, tuple[Request, list[Request]]] = {}  # parent id -> (parent, forks held for it)
        self.held: dict[int, Request] = {}  # id -> a fork held until its parent is prefilled
        # Snapshots of prefilled prefixes (the engine sets it with enable_prefix_caching): admissions start from
        # them; their pages and rows are given back whenever a request needs them (evict_snapshot).
        self.prefix_cache: PrefixCache | None = None
        self._step = _Step(0, decode=False, prefill=False)

    # ------------------------------------------------------------------ lifecycle
    def add(self, request: Request) -> None:
        """Queue a new request."""
        request.status = RequestStatus.WAITING
        request.arrival = time.monotonic()
        self.waiting.append(request)

    def admission_due(self, budget: int, now: float | None = None) -> bool:
        """Whether waiting prompts are admitted this step. Always, unless ``prefill_delay_factor`` > 0: then only once
        the oldest has waited ``prefill_delay_factor`` times the last prefill forward's time, or nothing runs, or the
        waiting feeds already fill ``budget`` (waiting longer cannot make the forward bigger). A prefill forward's cost
        is mostly fixed (the host's launches, per layer) when its tokens are few: prompts that arrive one by one
        each pay it alone, while the running requests wait. vLLM's ``scheduler_delay_factor`` is the same rule."""
        if not self.waiting:
            return False
        if self.prefill_delay_factor <= 0 or not self.running:
            return True
        now = time.monotonic() if now is None else now
        if now - self.waiting[0].arrival >= self.prefill_delay_factor * self.last_prefill_seconds:
            return True
        waiting_tokens = 0
        for request in self.waiting:
            waiting_tokens += len(request.prompt_ids) + len(request.output_ids)
            if waiting_tokens >= budget:
                return True
        return False

    def admit(self, keep: Snapshot | None = None) -> Request | None:
        """The next waiting request if it fits now, snapshots other than ``keep`` evicted as needed (it becomes
        running and prefilling; the caller opens its cache row and prefills it, and calls :meth:`requeue` or
        :meth:`finish` if that runs out of pages), else None."""
        if not self.waiting or not self._fits(self.waiting[0], keep):
            return None
        request = self.waiting.popleft()
        request.status = RequestStatus.RUNNING
        request.prefilling = True
        self.running.append(request)
        return request

    def schedule_prefill(self, budget: int,
                         max_chunks: int | None = None) -> tuple[list[tuple[Request, int]], Request | None]:
        """``(chunks, starved)``: this step's prefill batch, ``(request, tokens)`` pairs that share a
        budget of ``budget`` tokens, and a lone request whose next chunk cannot fit even in an otherwise
        empty cache (the caller fails it), else None.

        Requests already prefilling continue first (oldest first, so a long prompt goes on chunk by
        chunk); the budget left admits waiting requests (admission as in :meth:`can_admit`), whose rows
        are opened here (with prefix caching, copied from the snapshot of their longest cached prefix, which they
        continue from; a chunk ends at the block boundary whose state is to be kept); at most ``max_chunks`` chunks
        in all. Every chunk fits the free pages even if nothing merges; a chunk that does not waits for a later
        step (when no request is decoding, the newest running one is preempted so that the older ones can go on),
        prefix-cache snapshots being evicted first."""
        chunks: list[tuple[Request, int]] = []
        prefilling = [r for r in self.running if r.prefilling]
        if not prefilling and not self.waiting:  # nothing to prefill: no need to read the free count (a sync)
            return chunks, None
        free = self.cache.free_page_count()
        for request in prefilling:
            size = self._chunk_size(request.prefill_left, budget)
            if size == 0 or len(chunks) == max_chunks:
                return chunks, None
            size = self._cut(request, request.seen, size)
            need = self.chunk_pages(size)
            free = self._evict_for(need, free)
            if need > free:
                if len(self.running) == 1:
                    return chunks, request
                if not chunks and all(r.prefilling for r in self.running):
                    self.preempt(self.running[-1])
                return chunks, None
            chunks.append((request, size))
            budget, free = budget - size, free - need
        admitting = self.admission_due(budget)
        while admitting and budget > 0 and len(chunks) != max_chunks and self.waiting:
            request = self.waiting[0]
            feed = request.to_feed()
            snapshot = self._snapshot_for(request)
            start = 0 if snapshot is None else len(snapshot.tokens)
            request.park_at = 0 if self.prefix_cache is None else self.prefix_cache.parks(feed, start)
            if snapshot is None:
                size = self._first_chunk_size(len(feed), budget, first_of_step=not chunks)
            else:
                size = self._chunk_size(len(feed) - start, budget)
            size = self._cut(request, start, size)
            if size == 0:
                break
            # the first page of every head (or the snapshot's pages, copied), then the chunk
            need = (self.rows if snapshot is None else snapshot.pages) + self.chunk_pages(size)
            free = self._evict_for(need, free, keep=snapshot)
            if need > free:
                if not self.running and snapshot is not None:  # the copy does not fit beside its snapshot
                    free += self.prefix_cache.pages()
                    self.prefix_cache.clear()
                    continue
                if not self.running:  # alone in an empty cache: it can never run
                    self.waiting.popleft()
                    return chunks, request
                break
            if self.admit(keep=snapshot) is None:
                break
            request.row = self.cache.open_row() if snapshot is None else self.cache.fork_row(snapshot.row)
            request.seen = start
            if self.prefix_cache is not None:
                self.prefix_cache.record(len(feed), start)
            chunks.append((request, size))
            budget, free = budget - size, free - need
        return chunks, None

    # ------------------------------------------------------------------ prefix caching
    def _snapshot_for(self, request: Request) -> Snapshot | None:
        """The snapshot a waiting request starts from, or None (caching off, no hit, or prompt log-probs asked:
        the positions a snapshot skips would not be scored)."""
        if self.prefix_cache is None or request.params.prompt_logprobs is not None:
            return None
        return self.prefix_cache.lookup(request.to_feed())

    @staticmethod
    def _cut(request: Request, seen: int, size: int) -> int:
        """A chunk of a request that holds ``seen`` tokens, ending at its ``park_at`` rather than past it: the
        snapshot is the row's state after exactly ``park_at`` tokens."""
        return min(size, request.park_at - seen) if request.park_at > seen else size

    def evict_snapshot(self, keep: Snapshot | None = None) -> int:
        """Give the least recently used snapshot's row and pages back (not ``keep``); returns the pages freed (0:
        there was none)."""
        return 0 if self.prefix_cache is None else self.prefix_cache.evict_lru(keep)

    def _evict_for(self, need: int, free: int, keep: Snapshot | None = None) -> int:
        """Evict snapshots (not ``keep``) until ``need`` pages are free or none is left. ``free``: the pages the
        pass has not planned yet (the cache's count less the chunks already in it); returns it with what was
        freed."""
        while need > free and (freed := self.evict_snapshot(keep)):
            free += freed
        return free

    def _fits(self, request: Request, keep: Snapshot | None = None) -> bool:
        """:meth:`can_admit` now, snapshots other than ``keep`` evicted while it does not."""
        while not self.can_admit(request, self.cache.free_page_count(), self.cache.free_row_count()):
            if len(self.running) >= self.max_num_seqs or not self.evict_snapshot(keep):
                return False
        return True

    def _park(self, request: Request) -> None:
        """Copy a prefilling row that holds exactly ``park_at`` tokens into a snapshot, when a row and the pages
        are free beyond what the running requests are still expected to take (older snapshots go first)."""
        at, request.park_at = request.park_at, 0
        tokens = request.to_feed()[:at]
        if self.prefix_cache.holds(tokens):
            return
        pages = self.cache.row_pages(request.row)
        while not (self.cache.free_row_count() and
                   self.cache.free_page_count() - pages >= self.committed_growth() + self.rows):
            if not self.evict_snapshot():
                return
        self.prefix_cache.park(self.cache.fork_row(request.row), tokens, pages)

    def _first_chunk_size(self, feed: int, budget: int, first_of_step: bool) -> int:
        """A newly admitted request's first chunk. A feed that fits ``prefill_chunk`` is never split: the rest of a
        split feed would go through the continuation path (attention over the cached slots, one segment at a
        time), many times slower than the packed first chunks. So it waits for the next step when the budget left
        is short, unless it is the step's first chunk (then it runs whole, past the budget by at most
        ``prefill_chunk``: every step makes progress). Only with ``whole_prompts`` (a step budget shared with
        decode, which leaves odd remainders); otherwise the budget splits it."""
        if not self.whole_prompts or self.slot_cap is not None or not self.prefill_chunk or feed > self.prefill_chunk:
            return self._chunk_size(feed, budget)
        if feed <= budget or first_of_step:
            return feed
        return 0

    def _chunk_size(self, left: int, budget: int) -> int:
        """A request's next chunk: what is left of its feed, at most the budget. With eviction a chunk is
        never cut by the budget (0: it waits for the next step): the budget cuts the cache after every
        chunk, so a prompt is fed in the chunks of ``prefill_chunk`` tokens it would get alone."""
        if self.slot_cap is None:
            return min(left, budget)
        size = min(left, self.prefill_chunk or left)
        return size if size <= budget else 0

    def admit_forked(self, request: Request, row: int, seen: int) -> None:
        """A request that starts from a copy of another's prefilled cache row (the same prompt): it runs,
        decoding, at once."""
        request.status, request.row, request.seen, request.prefilling = RequestStatus.RUNNING, row, seen, False
        self.running.append(request)

    def prefilled(self, request: Request) -> None:
        """A request's whole feed is in the cache: it decodes from now on."""
        request.prefilling = False

    def requeue(self, request: Request) -> None:
        """Put a request whose prefill did not fit back at the head of the queue (not a preemption)."""
        self._release(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def preempt(self, request: Request) -> None:
        """Free a running request's pages; it waits first in line and is recomputed when readmitted."""
        self.requeue(request)
        request.preemptions += 1

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """End a request (stop, length, aborted, error): it leaves the queues and frees its pages."""
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.status, request.finish_reason, request.error = RequestStatus.FINISHED, reason, error

    def abort(self, request: Request) -> bool:
        """Finish a waiting or running request "aborted"; False when it had already finished."""
        if request.finished:
            return False
        self.finish(request, "aborted")
        return True

    def get(self, request_id: int) -> Request | None:
        """The unfinished request with this id, or None."""
        return next((r for r in (*self.waiting, *self.running) if r.id == request_id), None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def decoding_count(self) -> int:
        """Running requests past their prefill: each takes one token of the next step."""
        return sum(1 for r in self.running if not r.prefilling)

    def schedule_decode(self) -> tuple[list[Request], Request | None]:
        """``(batch, starved)``: the requests to decode this step, preempting the newest running ones
        until the step's worst case fits the free pages; ``starved`` is a lone request that cannot fit
        even so (the caller fails it), else None."""
        batch = [r for r in self.running if not r.prefilling]
        # A step takes at most one page per head of each row: when that fits, the exact worst case (a gather
        # and another sync) is not needed.
        while batch and (free := self.cache.free_page_count()) < self.rows * len(batch) and (
                free < self.cache.step_worst_case([r.row for r in batch], self.slot_cap)):
            if self.evict_snapshot():
                continue
            victim = self.preemption_victim()
            if victim is None:
                return [], batch[0]
            self.preempt(victim)
            batch = [r for r in self.running if not r.prefilling]
        return batch, None

    def _release(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        if request.row is not None:
            self.cache.close_row(request.row)
            request.row = None
        request.seen = 0
        request.prefilling = False
        request.park_at = 0

    # ------------------------------------------------------------------ page arithmetic
    def chunk_pages(self, tokens: int) -> int:
        """Pages a prefill chunk of ``tokens`` may take if nothing merges: the cache's own check
        (:func:`dmc.engine.pages.chunk_pages`)."""
        return self.cache.chunk_pages(tokens)

    def pages_for(self, tokens: int, capped: bool = True) -> int:
        """Estimated pages for a sequence of ``tokens`` at the estimated CR (+ the ready page)."""
        slots = tokens / self.estimate.ratio
        if capped and self.slot_cap is not None:
            slots = min(slots, self.slot_cap)
        return self.rows * (math.ceil(slots / self.page_size) + 1)

    def prefill_pages(self, request: Request) -> int:
        """Pages a request's prefill holds at its peak (with eviction: before a chunk is cut)."""
        feed = len(request.to_feed())
        if self.slot_cap is None:
            return self.pages_for(feed)
        return self.pages_for(min(feed, self.slot_cap + self.prefill_chunk), capped=False)

    def committed_growth(self) -> int:
        """Pages the running requests are still expected to take before they finish."""
        return sum(self.pages_for(r.total_tokens) - self.pages_for(r.seen) for r in self.running)

    def can_admit(self, request: Request, free_pages: int, free_rows: int) -> bool:
        """Admit when the request's expected pages fit beside what the running ones will still take.
        (Each decode step separately checks its exact worst case: :meth:`schedule_decode`.)"""
        if len(self.running) >= self.max_num_seqs or free_rows == 0:
            return False
        if not self.running:
            return free_pages >= min(self.prefill_pages(request) + self.rows, self.max_pages)
        return (free_pages - self.committed_growth() >= self.pages_for(request.total_tokens)
                and free_pages >= self.prefill_pages(request))

    def preemption_victim(self) -> Request | None:
        """The newest running request (it has the least work to redo)."""
        return self.running[-1] if len(self.running) > 1 else None

    # ------------------------------------------------------------------ forks
    def can_fork(self, request: Request, parent: Request) -> bool:
        """Whether ``request`` can start from ``parent``'s cache once it is prefilled: same prompt and prompt
        log-probs, ``parent`` queued or prefilling (not itself held for another), a policy whose rows can be
        copied (not eviction's: its per-row state is not copied)."""
        in_queue = parent.prefilling or (parent.status is RequestStatus.WAITING and parent.id not in self.held)
        return (self.policy.forks and not parent.finished and in_queue and not parent.output_ids
                and parent.prompt_ids == request.prompt_ids
                and parent.params.prompt_logprobs == request.params.prompt_logprobs)

    def hold(self, request: Request, parent: Request) -> None:
        """Hold ``request`` until ``parent`` is prefilled, to start from a copy of its row (:meth:`can_fork`)."""
        self.forks.setdefault(parent.id, (parent, []))[1].append(request)
        self.held[request.id] = request

    def _fork(self, prefilled: list[Request]) -> list[tuple[Request, int]]:
        """Start the requests held for these just prefilled ones from copies of their cache rows, while they fit
        (admission as for any request); the rest go back to the head of the queue, to be prefilled themselves.
        Returns ``(fork, index of its parent in prefilled)``."""
        forks, back = [], []
        for index, parent in enumerate(prefilled):
            for child in self.forks.pop(parent.id, (parent, []))[1]:
                if self.held.pop(child.id, None) is None:
                    continue  # aborted while held
                if back or not self._fits(child):
                    back.append(child)
                    continue
                try:
                    row = self.cache.fork_row(parent.row)
                except OutOfPages:
                    back.append(child)
                    continue
                self.admit_forked(child, row, parent.seen)
                forks.append((child, index))
        for child in reversed(back):
            self.requeue(child)
        return forks

    def _release_orphans(self) -> None:
        """Requests held for one that ended before its prefill did (aborted, refused) are prefilled themselves."""
        for parent_id, (parent, held) in list(self.forks.items()):
            if parent.finished:
                del self.forks[parent_id]
                for child in reversed(held):
                    if self.held.pop(child.id, None) is not None:
                        self.requeue(child)

    # ------------------------------------------------------------------ one engine step
    def step_budget(self) -> int:
        """The prefill tokens of the next step: ``prefill_chunk``, less the decoding requests' tokens when a step's
        tokens are bounded (``max_num_batched_tokens``: the decoding requests count first)."""
        budget = self.prefill_chunk
        if self.max_num_batched_tokens is not None:
            budget = min(budget, self.max_num_batched_tokens - self.decoding_count())
        return budget

    def begin_step(self, budget: int, decode: bool = True) -> None:
        """Start an engine step of ``budget`` prefill tokens, ending with a decode pass when ``decode``; then call
        :meth:`schedule` until it returns None, applying each pass's result before the next."""
        if self.forks:
            self._release_orphans()
        self._step = _Step(budget, decode)

    def schedule(self) -> SchedulerOutput | None:
        """The step's next pass (:class:`SchedulerOutput` says which passes a step has and why), None when the
        step is done. Opens the rows of admitted requests and forks, and preempts, as the pass needs."""
        step = self._step
        if step.forward is not None:
            forward, step.forward = step.forward, None
            return self._schedule_sampling(*forward)
        if step.prefill and step.budget > 0:
            output = self._schedule_forward(step)
            if output is not None:
                return output
        step.prefill = False
        if step.decode:
            step.decode = False
            batch, starved = self.schedule_decode()
            if batch or starved is not None:
                failed = [] if starved is None else [(starved, OUT_OF_MEMORY_DECODING)]
                return SchedulerOutput(decode=batch, failed=failed)
        return None

    def _schedule_forward(self, step: _Step) -> SchedulerOutput | None:
        """A prefill forward of the chunks :meth:`schedule_prefill` picks, or None when there are none (and no
        request starved). Another forward may follow only under a policy of a chunk per forward."""
        chunks, starved = self.schedule_prefill(step.budget, self.policy.chunks_per_forward)
        step.budget -= sum(size for _, size in chunks)
        step.prefill = bool(chunks) and self.policy.chunks_per_forward is not None
        if not chunks and starved is None:
            return None
        at, scored = scored_positions(chunks)
        return SchedulerOutput(chunks=chunks, at=at, scored=scored,
                               failed=[] if starved is None else [(starved, OUT_OF_MEMORY_PREFILL)])

    def _schedule_sampling(self, forward: SchedulerOutput, result: ModelOutput, done: list[int]) -> SchedulerOutput:
        """The sampling pass of a forward that completed the prompts of its chunks ``done`` (or scores prompt
        positions): their first tokens, those of the forks started from them (rows copied now, after the forward
        filled them, while the pages it left allow), the scored positions' log-probs."""
        requests = [r for r, _ in forward.chunks]
        prefilled = [requests[i] for i in done]
        forks = [(child, done[j]) for child, j in self._fork(prefilled)] if self.forks else []  # (fork, chunk)
        draws = [(r, i) for r, i in [(requests[i], i) for i in done] + forks if r.params.max_tokens > 0]
        return SchedulerOutput(draws=draws, logits=result.logits, scored=forward.scored, score_row=len(requests),
                               prefilled=prefilled + [child for child, _ in forks],
                               forks=[(child, requests[i]) for child, i in forks], started=result.started)

    def update_from_output(self, output: SchedulerOutput, result: ModelOutput) -> list[Request]:
        """Apply a pass's result: the one place request state changes once the model ran (tokens seen and
        generated, log-probs, text and stops, finishing, the CR estimate, ``last_prefill_seconds``). Returns the
        requests that changed (each of them has new output or finished)."""
        changed = []
        for request, error in output.failed:
            self.finish(request, "error", error)
            changed.append(request)
        kind = output.kind
        if kind == "prefill":
            self._update_prefill(output, result)
        elif kind == "sample":
            changed += self._update_sampling(output, result)
        elif kind == "decode":
            for request in output.decode:
                request.seen += 1
            changed += self._append_all(output.decode, result.tokens, result.logprobs)
        return changed

    def _update_prefill(self, output: SchedulerOutput, result: ModelOutput) -> None:
        """A forward's chunks are in the cache: requests whose feed is all there decode from now on; their slots go
        into the CR estimate; their sampling pass is due when they have a token to draw (or positions to score)."""
        done = []
        for i, (request, size) in enumerate(output.chunks):
            request.seen += size
            if request.park_at and request.seen == request.park_at:
                self._park(request)
            if request.prefill_left == 0:
                self.prefilled(request)
                done.append(i)
        if not done and not output.scored:
            self.last_prefill_seconds = time.perf_counter() - result.started  # queued, not waited for
            return
        finished = [output.chunks[i][0] for i in done]
        if self.policy.observes_compression and finished:
            self._observe(finished)
        self._step.forward = (output, result, done)

    def _update_sampling(self, output: SchedulerOutput, result: ModelOutput) -> list[Request]:
        """The first tokens of prefilled requests (and forks), the scored positions' log-probs; a request asking
        for ``max_tokens=0`` (scoring only) finishes."""
        scores = iter(result.scores)
        for request, positions in output.scored:
            request.prompt_logprobs.extend(next(scores) for _ in positions)
        self.last_prefill_seconds = time.perf_counter() - output.started  # the forward's time, its GPU work included
        for child, parent in output.forks:
            if child.prompt_logprobs is not None:
                child.prompt_logprobs = list(parent.prompt_logprobs)
        for request in output.prefilled:
            if request.params.max_tokens == 0:  # scored only
                self.finish_counted(request, "length")
        self._append_all([r for r, _ in output.draws], result.tokens, result.logprobs)
        return output.prefilled

    def _observe(self, prefilled: list[Request]) -> None:
        """Add the slots of these just prefilled requests to the admission's CR estimate (one wait)."""
        # Pages hold the tokens that went through DMC; a delayed model's raw window is fixed memory.
        rows = to_device([[r.row for r in prefilled]], torch.long, self.cache.device)[0]
        for request, slots in zip(prefilled, self.cache.lens[:, rows].sum(dim=(0, 2)).tolist()):
            committed = request.seen - self.cache.raw_held(request.seen)
            self.estimate.observe(committed * self.rows, slots)

    def _append_all(self, requests: list[Request], tokens: list[int],
                    logprobs: list[TokenLogprob | None]) -> list[Request]:
        """Append each request's new token (and its log-probs); finish those that hit a stop or their length."""
        for request, token, logprob in zip(requests, tokens, logprobs):
            if request.logprobs is not None:
                request.logprobs.append(logprob)
            self._append(request, token)
        return list(requests)

    def _append(self, request: Request, token: int) -> None:
        request.output_ids.append(token)
        p = request.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            reason = "stop"
        elif len(request.output_ids) >= p.max_tokens or request.seen + 1 >= self.max_model_len:
            reason = "length"
        else:
            reason = None
        detokenizer = request.detokenizer
        if detokenizer is not None:
            detokenizer.update(request.output_ids, final=reason is not None)
            request.text = detokenizer.text
            if detokenizer.stopped:
                reason = "stop"
        if reason is not None:
            self.finish_counted(request, reason)

    def finish_counted(self, request: Request, reason: str) -> None:
        """:meth:`finish` a request that ran, recording its realized compression (``request.compression``)."""
        slots = self.cache.slot_counts(request.row, request.seen).double()[:, None, :]  # [L, 1, H], raw window incl.
        stats = CompressionStats(tokens=torch.full_like(slots, request.seen), slots=slots)
        request.compression = {"tokens": request.seen, "slots": int(slots.sum()), **stats.summary()}
        self.finish(request, reason)
