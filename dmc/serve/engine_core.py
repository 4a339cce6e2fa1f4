"""The engine core: the loop that owns :class:`dmc.LLM` and runs continuous batching for every client.

It runs wherever the server puts it: in a process of its own (``dmc serve``'s default, as vLLM v1's engine
core: it shares no interpreter lock with the HTTP handlers, so SSE framing and JSON for hundreds of streams
never delay a step) or in a thread of the server's process. Either way it speaks in plain messages: commands
in (``("add", [Submission...])``, ``("abort", [key...])``, ``("stop", None)``) and one :class:`StepOutputs`
out per engine step, holding what every request that changed gained (new token ids, text that can no longer
change, the finish), so the per-step work outside the model is one message, not one callback per request.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.config import EngineConfig

log = logging.getLogger("dmc.serve")
IDLE_POLL = 0.05  # seconds an idle core waits for a command before it looks again
PAGES_EVERY = 0.05  # free pages are read (a host sync on a GPU) at most this often while busy


@dataclass
class Submission:
    """One engine request (one choice of one HTTP request): its key, chosen by the server, names it in outputs."""

    key: int
    prompt_ids: list[int]
    params: object  # dmc.SamplingParams
    fork_of: int | None = None  # the key of an earlier choice of the same prompt: start from its prefilled cache


@dataclass(slots=True)
class Output:
    """What one request gained in one step."""

    key: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None  # stop, length, aborted, error, shutdown; None while it runs
    error: str | None = None
    completion_tokens: int = 0
    compression: dict | None = None
    preemptions: int = 0
    logprobs: list | None = None  # a dmc.TokenLogprob per token of token_ids, when the request asked
    prompt_logprobs: list | None = None  # the prompt's (first entry None), once, in the output after its prefill


@dataclass
class StepOutputs:
    """One message from the core: the outputs of a step (possibly none) and the engine's state after it."""

    outputs: list[Output] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    free_pages: int | None = None
    total_pages: int | None = None
    step_seconds: float = 0.0  # the engine step's wall time (model and host work)
    prefix_cache: dict | None = None  # LLM.prefix_cache_stats() when caching is on, read with the pages


@dataclass
class EngineSpec:
    """How to build the engine in a process of its own (picklable, unlike a function that closes over state):
    the model directory and the engine's settings."""

    model: str
    config: EngineConfig
    warmup: str = "auto"  # on, off, auto (on CUDA)


def build_llm(spec: EngineSpec):
    """The :class:`dmc.LLM` of ``spec``, warmed up if asked (compiles and graph captures before serving)."""
    from ..engine import LLM
    llm = LLM(spec.model, config=spec.config, progress=False)
    if spec.warmup == "on" or (spec.warmup == "auto" and llm.device.type == "cuda"):
        start = time.perf_counter()
        done = llm.warmup()
        log.info("warmed up in %.1f s: prompt lengths %s (packed in pairs: %s), decode graphs for batches %s",
                 time.perf_counter() - start, done["prompt_lengths"], done["packed_lengths"], done["graph_buckets"])
    return llm


def engine_info(llm) -> dict:
    """What the HTTP side needs to know of the engine (it never touches the engine itself)."""
    config = getattr(getattr(llm, "model", None), "config", None)
    return {"max_model_len": llm.max_model_len, "vocab_size": getattr(config, "vocab_size", None) or 2**31,
            "has_tokenizer": llm.tokenizer is not None, "device": str(llm.device),
            "free_pages": getattr(llm, "initial_free_pages", None)}


class _Tracked:
    """The core's view of one request: what it has already sent of it."""

    __slots__ = ("key", "request", "sent_tokens", "sent_chars", "sent_prompt")

    def __init__(self, key: int, request) -> None:
        self.key, self.request, self.sent_tokens, self.sent_chars = key, request, 0, 0
        self.sent_prompt = False  # its prompt log-probs (when it asked for them)


class EngineCore:
    """Runs ``llm`` until told to stop. ``receive(block)`` returns the commands that arrived (waiting up to
    :data:`IDLE_POLL` seconds for one when ``block``); ``emit`` takes each :class:`StepOutputs`."""

    def __init__(self, llm, receive: Callable[[bool], list], emit: Callable[[StepOutputs], None]) -> None:
        self.llm, self.receive, self.emit = llm, receive, emit
        self._by_id: dict[int, _Tracked] = {}  # engine request id -> its tracking, while unfinished
        self._by_key: dict[int, _Tracked] = {}
        self._stopping = False
        self._pages_at = 0.0
        self._pages: tuple[int | None, int | None] = (None, None)
        self._prefix_cache: dict | None = None

    def run(self) -> None:
        """The loop: commands, one engine step, one message; at the end every unfinished request is failed
        "shutdown" (and its pages freed)."""
        llm = self.llm
        while not self._stopping:
            outputs: list[Output] = []
            busy = llm.has_unfinished()
            commands = self.receive(not busy)
            start = time.perf_counter()
            for kind, payload in commands:
                self._execute(kind, payload, outputs)
            if self._stopping:
                break
            if llm.has_unfinished():
                timer = llm.step_timer
                start = timer.add("commands", start) if busy else time.perf_counter()
                try:
                    changed = llm.step()
                except Exception as exc:  # an engine bug: fail what runs, keep serving
                    log.exception("engine step failed; aborting the %d running request(s)", len(self._by_id))
                    self._fail_all(f"engine error: {type(exc).__name__}: {exc}", "error", outputs)
                else:
                    collect = time.perf_counter()
                    for request in changed:
                        tracked = self._by_id.get(request.id)
                        if tracked is not None:
                            self._collect(tracked, outputs)
                    timer.add("outputs", collect)
                sent = time.perf_counter()
                self._send(outputs, sent - start)
                timer.add("send", sent)
            elif outputs:
                self._send(outputs, 0.0)
            else:
                self._send(outputs, 0.0, force_pages=True)  # idle: the state, so /health stays current
        outputs = []
        self._fail_all("the server is shutting down", "shutdown", outputs)
        self._send(outputs, 0.0, force_pages=True)

    def _execute(self, kind: str, payload, outputs: list[Output]) -> None:
        if kind == "stop":
            self._stopping = True
        elif kind == "add":
            for sub in payload:
                parent = self._by_key.get(sub.fork_of) if sub.fork_of is not None else None
                try:
                    request = self.llm.add_request(sub.prompt_ids, sub.params,
                                                   fork_of=None if parent is None else parent.request)
                except Exception as exc:  # noqa: BLE001 - refused by the engine: this request only
                    outputs.append(Output(sub.key, [], finish_reason="error", error=f"{type(exc).__name__}: {exc}"))
                    continue
                tracked = _Tracked(sub.key, request)
                if not request.finished:  # else refused at once (bad params): its output says why
                    self._by_id[request.id] = self._by_key[sub.key] = tracked
                self._collect(tracked, outputs)
        elif kind == "abort":
            for key in payload:
                tracked = self._by_key.pop(key, None)
                if tracked is not None:
                    self._by_id.pop(tracked.request.id, None)
                    self.llm.abort(tracked.request)

    def _collect(self, tracked: _Tracked, outputs: list[Output]) -> None:
        """The request's new tokens and the text that can no longer change, and its finish."""
        request = tracked.request
        ids = request.output_ids
        new_ids = ids[tracked.sent_tokens:]
        end = request.stable_text_length()
        piece = request.text[tracked.sent_chars:end] if end > tracked.sent_chars else ""
        finished = request.finished
        if not (new_ids or piece or finished):
            return
        out = Output(tracked.key, new_ids, piece, completion_tokens=len(ids))
        if request.logprobs is not None:
            out.logprobs = request.logprobs[tracked.sent_tokens:]
        scored = request.prompt_logprobs
        if scored is not None and not tracked.sent_prompt and len(scored) == len(request.prompt_ids):
            out.prompt_logprobs, tracked.sent_prompt = scored, True
        tracked.sent_tokens, tracked.sent_chars = len(ids), max(tracked.sent_chars, end)
        if finished:
            self._by_id.pop(request.id, None)
            self._by_key.pop(tracked.key, None)
            out.finish_reason, out.error = request.finish_reason, request.error
            out.compression, out.preemptions = request.compression, request.preemptions
        outputs.append(out)

    def _fail_all(self, message: str, reason: str, outputs: list[Output]) -> None:
        for tracked in list(self._by_id.values()):
            try:
                self.llm.abort(tracked.request)
            except Exception:  # noqa: BLE001 - the engine may be broken; the request is failed anyway
                log.exception("abort failed")
            outputs.append(Output(tracked.key, [], finish_reason=reason, error=message,
                                  completion_tokens=tracked.sent_tokens))
        self._by_id.clear()
        self._by_key.clear()

    def _send(self, outputs: list[Output], seconds: float, force_pages: bool = False) -> None:
        scheduler = self.llm.scheduler
        now = time.perf_counter()
        if force_pages or now - self._pages_at >= PAGES_EVERY:
            self._pages_at = now
            free = int(self.llm.cache.free_page_count())
            self._pages = (free, int(getattr(self.llm, "initial_free_pages", None) or free))
            stats = getattr(self.llm, "prefix_cache_stats", None)
            self._prefix_cache = None if stats is None else stats()
        self.emit(StepOutputs(outputs, len(scheduler.running), len(scheduler.waiting), *self._pages,
                              step_seconds=seconds, prefix_cache=self._prefix_cache))


# ---------------------------------------------------------------------- the core in a process of its own
def run_engine_process(spec: EngineSpec, commands, outputs, log_level: str = "INFO") -> None:
    """The engine process: build the engine, say so (``("ready", info)`` or ``("failed", message)``), then
    run the core over the two pipe ends until a stop command, or until the server's end of a pipe closes
    (the server died: nothing to serve). Signals are the server's to handle: it sends the stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    try:
        llm = build_llm(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits with its message
        outputs.send(("failed", (type(exc).__name__, str(exc))))
        return
    outputs.send(("ready", engine_info(llm)))

    def receive(block: bool) -> list:
        got = []
        try:
            if commands.poll(IDLE_POLL if block else 0):
                got.append(commands.recv())
                while commands.poll(0):
                    got.append(commands.recv())
        except (EOFError, OSError):  # the server is gone
            got.append(("stop", None))
        return got

    def emit(step: StepOutputs) -> None:
        try:
            outputs.send(("step", step))
        except (BrokenPipeError, OSError):
            os._exit(0)  # the server is gone: nobody reads the outputs

    EngineCore(llm, receive, emit).run()
    outputs.send(("stopped", llm.step_timer.summary()))
