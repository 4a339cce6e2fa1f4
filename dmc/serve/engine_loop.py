"""The server's side of the engine: submit and abort requests, and hand each step's outputs to the HTTP requests.

HTTP handlers never touch the engine. They give :class:`RequestHandle` objects to an :class:`EngineLoop`, which
sends them to the :class:`~dmc.serve.engine_core.EngineCore` as plain commands and receives one
:class:`~dmc.serve.engine_core.StepOutputs` message per engine step. That message is turned into one
:class:`Delta` per request that changed, the Prometheus metrics are updated (time to first token and
inter-token latency as the server sees them), and the deltas reach their requests' asyncio queues with one
``call_soon_threadsafe`` per event loop and step.

- :class:`EngineProcess` (``dmc serve``'s default) runs the core in a process of its own, fed through two
  pipes; a reader thread here receives its messages. If that process dies, every open request ends with a
  503 ("unavailable"), /health answers 503, and new requests are refused at once.
- :class:`EngineLoop` runs the core in a thread of this process (``dmc serve --engine thread``; the tests'
  in-process apps).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine_core import IDLE_POLL, EngineCore, EngineSpec, StepOutputs, Submission, engine_info, run_engine_process
from .metrics import Metrics

log = logging.getLogger("dmc.serve")
_keys = itertools.count()


@dataclass
class Delta:
    """What one engine request (one choice) gained since the last delta."""

    index: int  # the choice index in the HTTP response
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # stop, length, aborted, error, shutdown, unavailable
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compression: dict | None = None
    first: bool = False  # the choice's first delta (chat: carries the role)
    logprobs: list | None = None  # a dmc.TokenLogprob per token of token_ids, when asked for
    prompt_logprobs: list | None = None  # the prompt's (first entry None), once


class RequestHandle:
    """One engine request (one choice of one HTTP request) as the server sees it: its queue of deltas and its
    timings."""

    def __init__(self, index: int, prompt_ids: list[int], params, sink: asyncio.Queue,
                 loop: asyncio.AbstractEventLoop, fork_of: int | None = None) -> None:
        self.key = next(_keys)  # names it to the engine core
        self.index, self.prompt_ids, self.params = index, prompt_ids, params
        self.fork_of = fork_of  # the key of the prompt's first choice, whose prefill this one shares
        self.sink, self.loop = sink, loop
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.completion_tokens = 0
        self.done = False
        self.emitted = False


class EngineError(RuntimeError):
    """The engine could not be started; ``kind`` is the name of the exception that stopped it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class EngineLoop:
    """The engine core in a background thread of this process; see the module docstring.

    Args:
        make_llm: builds the :class:`dmc.LLM` (called in the engine thread, which then owns it).
        metrics: updated after every step.
    """

    def __init__(self, make_llm: Callable[[], object] | None, metrics: Metrics) -> None:
        self._make_llm = make_llm
        self.metrics = metrics
        self.info: dict = {}  # max_model_len, vocab_size, has_tokenizer, device (engine_core.engine_info)
        self._handles: dict[int, RequestHandle] = {}  # key -> handle, while unfinished
        self._lock = threading.Lock()  # the handles' registration and closing, from both threads
        self._dead: str | None = None  # why the engine stopped serving (None: it serves, or has not started)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Read by /health (plain values written when a step's message arrives).
        self.snapshot: dict = {"running": 0, "waiting": 0, "free_pages": None, "total_pages": None}
        # Where the time goes (EngineLoop.profile()): the engine's sections, filled when it stops, and the
        # server's handling of the engine's messages.
        self.engine_profile: dict | None = None
        self._dispatch_seconds = 0.0
        self._messages = 0
        self._busy_messages = 0
        self._step_seconds = 0.0

    # ------------------------------------------------------------------ called from the HTTP side
    def start(self) -> None:
        """Start the thread and wait until the engine is built (re-raises its construction error)."""
        self._thread = threading.Thread(target=self._run_thread, name="dmc-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, handles: list[RequestHandle]) -> None:
        with self._lock:
            if self._dead is None:
                for handle in handles:
                    self._handles[handle.key] = handle
        if self._dead is not None:
            self._post([(h, self._closing(h, "unavailable", self._dead)) for h in handles])
            return
        self.metrics.prompt_tokens.labels(self.metrics.model).inc(sum(len(h.prompt_ids) for h in handles))
        self._command(("add", [Submission(h.key, h.prompt_ids, h.params, h.fork_of) for h in handles]))

    def abort(self, handles: list[RequestHandle]) -> None:
        """End these requests now ("aborted"); the engine frees their pages at its next step."""
        closed = []
        with self._lock:
            for handle in handles:
                if not handle.done and self._handles.pop(handle.key, None) is not None:
                    closed.append((handle, self._closing(handle, "aborted", None)))
        if closed:
            self._command(("abort", [h.key for h, _ in closed]))
            self._post(closed)

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what still runs, free its pages, end the thread."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._command(("stop", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def _command(self, command: tuple) -> None:
        self._commands.put(command)

    def _started(self, info: dict) -> None:
        self.info = info
        self.snapshot["free_pages"] = self.snapshot["total_pages"] = info.get("free_pages")
        self.metrics.set_pages(info.get("free_pages"), info.get("free_pages"))

    # ------------------------------------------------------------------ the engine thread
    def _run_thread(self) -> None:
        try:
            llm = self._make_llm()
            self._started(engine_info(llm))
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            EngineCore(llm, self._receive, self._dispatch).run()
        except BaseException as exc:  # noqa: BLE001 - the loop itself broke: nothing serves any more
            log.exception("the engine loop stopped")
            self._die(f"the engine stopped: {type(exc).__name__}: {exc}")
        self.engine_profile = llm.step_timer.summary()

    def _receive(self, block: bool) -> list:
        commands = []
        try:
            commands.append(self._commands.get(timeout=IDLE_POLL) if block else self._commands.get_nowait())
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    # ------------------------------------------------------------------ a step's outputs → the HTTP requests
    def profile(self) -> dict:
        """The engine's time per step by section (once it stopped) and the server's per message of the engine."""
        messages = max(self._messages, 1)
        return {"engine": self.engine_profile,
                "server": {"messages": self._messages, "steps": self._busy_messages,
                           "dispatch_ms_per_message": round(self._dispatch_seconds / messages * 1e3, 4),
                           "engine_step_ms": round(self._step_seconds / max(self._busy_messages, 1) * 1e3, 4)}}

    def _dispatch(self, step: StepOutputs) -> None:
        now = time.perf_counter()
        m, model = self.metrics, self.metrics.model
        updates = []
        tokens = 0
        with self._lock:
            for out in step.outputs:
                handle = self._handles.get(out.key)
                if handle is None or handle.done:  # aborted by its client meanwhile
                    continue
                new = len(out.token_ids)
                if new:  # a step can bring two tokens (the prefill's and the decode's): each gets an ITL sample
                    gaps = new
                    if handle.first_token_at is None:
                        handle.first_token_at = now
                        m.ttft.labels(model).observe(now - handle.arrival)
                        gaps, gap = gaps - 1, 0.0
                    else:
                        gap = (now - handle.last_token_at) / gaps
                    for _ in range(gaps):
                        m.itl.labels(model).observe(gap)
                    handle.last_token_at = now
                    tokens += new
                handle.completion_tokens = out.completion_tokens or handle.completion_tokens
                delta = Delta(index=handle.index, text=out.text, token_ids=out.token_ids,
                              prompt_tokens=len(handle.prompt_ids), completion_tokens=handle.completion_tokens,
                              first=not handle.emitted, logprobs=out.logprobs, prompt_logprobs=out.prompt_logprobs)
                handle.emitted = True
                if out.finish_reason is not None:
                    self._handles.pop(out.key, None)
                    handle.done = True
                    delta.finished, delta.finish_reason, delta.error = True, out.finish_reason, out.error
                    delta.compression = out.compression
                    m.requests.labels(model, out.finish_reason).inc()
                    if out.preemptions:
                        m.preemptions.labels(model).inc(out.preemptions)
                    if out.compression:
                        m.observe_compression(out.compression["cr"] * out.compression["slots"],
                                              out.compression["slots"])
                    m.e2e.labels(model).observe(now - handle.arrival)
                updates.append((handle, delta))
        if tokens:
            m.generation_tokens.labels(model).inc(tokens)
        self._post(updates)
        self.snapshot.update(running=step.running, waiting=step.waiting, free_pages=step.free_pages,
                             total_pages=step.total_pages)
        m.set_queues(step.running, step.waiting)
        m.set_pages(step.free_pages, step.total_pages)
        if step.prefix_cache is not None:
            self.snapshot["prefix_cache"] = step.prefix_cache
            m.set_prefix_cache(step.prefix_cache)
        self._messages += 1
        if step.step_seconds:
            self._busy_messages += 1
            self._step_seconds += step.step_seconds
        self._dispatch_seconds += time.perf_counter() - now

    def _closing(self, handle: RequestHandle, reason: str, error: str | None) -> Delta:
        """The last delta of a request the server ends itself (aborted; the engine gone)."""
        handle.done = True
        self.metrics.requests.labels(self.metrics.model, reason).inc()
        delta = Delta(index=handle.index, finished=True, finish_reason=reason, error=error,
                      prompt_tokens=len(handle.prompt_ids), completion_tokens=handle.completion_tokens,
                      first=not handle.emitted)
        handle.emitted = True
        return delta

    def _die(self, why: str) -> None:
        """The engine is gone: end every open request with a 503 ("unavailable"); later ones get it at once."""
        with self._lock:
            self._dead = why
            handles = list(self._handles.values())
            self._handles.clear()
            closing = [(h, self._closing(h, "unavailable", why)) for h in handles if not h.done]
        self._post(closing)

    @staticmethod
    def _post(updates: list) -> None:
        """Hand the deltas to their HTTP requests' queues (one event-loop callback per loop)."""
        by_loop: dict = {}
        for handle, delta in updates:
            by_loop.setdefault(handle.loop, []).append((handle.sink, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (server gone)
                pass


class EngineProcess(EngineLoop):
    """The engine core in a process of its own (spawned: CUDA is initialised there only), built from ``spec``;
    see the module docstring."""

    def __init__(self, spec: EngineSpec, metrics: Metrics, log_level: str = "INFO") -> None:
        super().__init__(None, metrics)
        self.spec, self.log_level = spec, log_level
        self._process = None
        self._send_lock = threading.Lock()
        self._stopped = threading.Event()  # the core said it stopped (a clean exit)

    def start(self) -> None:
        """Spawn the engine process and wait until its engine is built (EngineError if it could not be)."""
        ctx = multiprocessing.get_context("spawn")
        commands_out, self._commands_in = ctx.Pipe(duplex=False)
        self._outputs, outputs_in = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=run_engine_process, name="dmc-engine", daemon=True,
                                    args=(self.spec, commands_out, outputs_in, self.log_level))
        self._process.start()
        commands_out.close()  # the child's ends: closed here, so that either side sees the other go
        outputs_in.close()
        try:
            kind, payload = self._outputs.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise EngineError("EngineProcessDied",
                              f"the engine process exited with code {self._process.exitcode} before it was ready")
        if kind == "failed":
            self._process.join(10)
            raise EngineError(*payload)
        self._started(payload)
        self._thread = threading.Thread(target=self._read, name="dmc-engine-reader", daemon=True)
        self._thread.start()

    def _command(self, command: tuple) -> None:
        try:
            with self._send_lock:
                self._commands_in.send(command)
        except (BrokenPipeError, OSError):
            self._die(self._death())

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._outputs.recv()
            except (EOFError, OSError):
                break
            if kind == "step":
                self._dispatch(payload)
            elif kind == "stopped":
                self.engine_profile = payload
                self._stopped.set()
                break
        if not self._stopped.is_set():
            self._process.join(5)
            self._die(self._death())

    def _death(self) -> str:
        code = None if self._process is None else self._process.exitcode
        return (f"the engine process exited (code {code}); the server cannot generate any more: restart it"
                if code is not None else "the engine process stopped answering; restart the server")

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what still runs, free its pages, end the engine process (killed if it does not end in time)."""
        if self._process is None:
            return
        if self._process.is_alive():
            self._command(("stop", None))
            if self._thread is not None:
                self._thread.join(timeout)
            self._process.join(5)
        if self._process.is_alive():
            log.warning("the engine process did not stop in time: terminating it")
            self._process.terminate()
            self._process.join(5)

    @property
    def alive(self) -> bool:
        return (self._dead is None and self._process is not None and self._process.is_alive()
                and self._thread is not None and self._thread.is_alive())


def _put_all(items) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)
