"""The one engine loop: a thread that owns ``dmc.LLM`` and runs continuous batching for every client.

HTTP handlers never touch the engine. They put commands on a thread-safe queue (``submit``,
``abort``); the loop drains it between steps, calls ``LLM.add_request`` / ``LLM.step`` /
``LLM.abort``, and hands each request's new text and tokens to the asyncio queue of the HTTP
request that owns it (one ``call_soon_threadsafe`` per step). So all clients share each decode
step, and no lock is held around a request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .metrics import Metrics

log = logging.getLogger("dmc.serve")


@dataclass
class Delta:
    """What one engine request (one choice) gained since the last delta."""

    index: int  # the choice index in the HTTP response
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # stop, length, aborted, error, shutdown
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compression: dict | None = None
    first: bool = False  # the choice's first delta (chat: carries the role)


class RequestHandle:
    """One engine request (one choice of one HTTP request) and its streaming state. Only the engine
    thread touches the fields below ``sink``; the HTTP side reads what arrives in ``sink``."""

    def __init__(self, index: int, prompt_ids: list[int], params, sink: asyncio.Queue,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.index, self.prompt_ids, self.params = index, prompt_ids, params
        self.sink, self.loop = sink, loop
        self.arrival = time.perf_counter()
        self.request = None  # the engine's request, once submitted
        self.sent_tokens = 0
        self.sent_chars = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        # Text that could still turn into a stop string is held back until it cannot.
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.done = False
        self.emitted = False


def _state(request) -> tuple[list[int], str, str | None, str | None, dict | None, int]:
    """The fields of an engine request (what ``LLM.add_request`` returns) that the server reads."""
    return (request.output_ids, request.text, request.finish_reason, request.error, request.compression,
            request.preemptions)


class EngineLoop:
    """Owns the engine in a background thread; see the module docstring.

    Args:
        make_llm: builds the :class:`dmc.LLM` (called in the engine thread, which then owns it).
        metrics: updated after every step.
        idle_poll: seconds the idle loop waits for a command before looking again.
    """

    def __init__(self, make_llm: Callable[[], object], metrics: Metrics, idle_poll: float = 0.05) -> None:
        self._make_llm = make_llm
        self.metrics = metrics
        self.idle_poll = idle_poll
        self.llm = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}  # engine request id -> handle, while unfinished
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = False
        self._pages_at = 0.0
        # Read by /health (plain values written by the engine thread).
        self.snapshot: dict = {"running": 0, "waiting": 0, "free_pages": None, "total_pages": None}

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> None:
        """Start the thread and wait until the engine is built (re-raises its construction error)."""
        self._thread = threading.Thread(target=self._run, name="dmc-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, handles: list[RequestHandle]) -> None:
        self._commands.put(("add", handles))

    def abort(self, handles: list[RequestHandle]) -> None:
        self._commands.put(("abort", handles))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what still runs, free its pages, end the thread."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            self.llm = self._make_llm()
            self._update_pages(force=True)
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        llm = self.llm
        while not self._stopping:
            busy = llm.has_unfinished()
            for command in self._drain(block=not busy):
                self._execute(*command)
            if self._stopping:
                break
            if not llm.has_unfinished():
                self._publish(force_pages=True)
                continue
            try:
                changed = llm.step()
            except Exception as exc:  # an engine bug: fail what runs, keep serving
                log.exception("engine step failed; aborting the %d running request(s)", len(self._handles))
                self._fail_all(f"engine error: {type(exc).__name__}: {exc}", "error")
                continue
            self._deliver(changed)
            self._publish()
        self._fail_all("the server is shutting down", "shutdown")
        self._publish(force_pages=True)

    def _drain(self, block: bool) -> list[tuple]:
        commands = []
        try:
            commands.append(self._commands.get(timeout=self.idle_poll) if block else self._commands.get_nowait())
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _execute(self, kind: str, handles) -> None:
        if kind == "stop":
            self._stopping = True
        elif kind == "add":
            finished = []
            for handle in handles:
                try:
                    handle.request = self.llm.add_request(handle.prompt_ids, handle.params)
                except Exception as exc:  # noqa: BLE001 - refused by the engine: this request only
                    self._close(handle, "error", f"{type(exc).__name__}: {exc}", None)
                    continue
                self.metrics.prompt_tokens.labels(self.metrics.model).inc(len(handle.prompt_ids))
                if handle.request.finished:  # refused at once (bad params)
                    finished.append(handle)
                else:
                    self._handles[handle.request.id] = handle
            for handle in finished:
                self._emit_now(handle, handle.request)
        elif kind == "abort":
            for handle in handles:
                if handle.request is not None and not handle.done:
                    self.llm.abort(handle.request)
                    self._handles.pop(handle.request.id, None)
                    self._close(handle, "aborted", None, None)

    def _emit_now(self, handle: RequestHandle, request) -> None:
        updates: list = []
        self._update(handle, request, time.perf_counter(), updates)
        self._post(updates)

    def _deliver(self, changed) -> None:
        now = time.perf_counter()
        updates: list = []
        for request in changed:
            handle = self._handles.get(request.id)
            if handle is not None:
                self._update(handle, request, now, updates)
        self._post(updates)

    def _update(self, handle: RequestHandle, request, now: float, updates: list) -> None:
        output_ids, text, reason, error, compression, preemptions = _state(request)
        new_ids = output_ids[handle.sent_tokens:]
        m, model = self.metrics, self.metrics.model
        if new_ids:  # a step can bring two tokens (the prefill's and the decode's): each gets an ITL sample
            gaps = len(new_ids)
            if handle.first_token_at is None:
                handle.first_token_at = now
                m.ttft.labels(model).observe(now - handle.arrival)
                gaps, gap = gaps - 1, 0.0
            else:
                gap = (now - handle.last_token_at) / gaps
            for _ in range(gaps):
                m.itl.labels(model).observe(gap)
            handle.last_token_at = now
            m.generation_tokens.labels(model).inc(len(new_ids))
        finished = reason is not None
        end = len(text)
        if not finished:  # hold back a possible stop string's start and a partial UTF-8 character
            end -= handle.holdback
            while end > handle.sent_chars and text[end - 1] == "\ufffd":
                end -= 1
        piece = text[handle.sent_chars:end] if end > handle.sent_chars else ""
        if not (new_ids or piece or finished):
            return
        delta = Delta(index=handle.index, text=piece, token_ids=list(new_ids), prompt_tokens=len(handle.prompt_ids),
                      completion_tokens=len(output_ids), first=not handle.emitted)
        handle.emitted = True
        handle.sent_tokens = len(output_ids)
        handle.sent_chars = max(handle.sent_chars, end)
        if finished:
            self._handles.pop(request.id, None)
            handle.done = True
            delta.finished, delta.finish_reason, delta.error, delta.compression = True, reason, error, compression
            m.requests.labels(model, reason).inc()
            if preemptions:
                m.preemptions.labels(model).inc(preemptions)
            if compression:
                m.observe_compression(compression["cr"] * compression["slots"], compression["slots"])
            m.e2e.labels(model).observe(now - handle.arrival)
        updates.append((handle, delta))

    def _close(self, handle: RequestHandle, reason: str, error: str | None, updates: list | None) -> None:
        handle.done = True
        self.metrics.requests.labels(self.metrics.model, reason).inc()
        delta = Delta(index=handle.index, finished=True, finish_reason=reason, error=error,
                      prompt_tokens=len(handle.prompt_ids), completion_tokens=handle.sent_tokens,
                      first=not handle.emitted)
        handle.emitted = True
        if updates is None:
            self._post([(handle, delta)])
        else:
            updates.append((handle, delta))

    def _fail_all(self, message: str, reason: str) -> None:
        updates: list = []
        for handle in list(self._handles.values()):
            try:
                self.llm.abort(handle.request)
            except Exception:  # noqa: BLE001 - the engine may be broken; the handle is closed anyway
                log.exception("abort failed")
            self._close(handle, reason, message, updates)
        self._handles.clear()
        self._post(updates)

    def _post(self, updates: list) -> None:
        """Hand the deltas to their HTTP requests' queues (one event-loop callback per loop)."""
        by_loop: dict = {}
        for handle, delta in updates:
            by_loop.setdefault(handle.loop, []).append((handle.sink, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (server gone)
                pass

    def _publish(self, force_pages: bool = False) -> None:
        running = sum(1 for h in self._handles.values() if h.first_token_at is not None)
        waiting = len(self._handles) - running
        self.metrics.set_queues(running, waiting)
        self.snapshot["running"], self.snapshot["waiting"] = running, waiting
        self._update_pages(force_pages)

    def _update_pages(self, force: bool = False) -> None:
        """Free pages (a host sync on GPU: at most every 50 ms while busy, always when idle)."""
        now = time.perf_counter()
        if not force and now - self._pages_at < 0.05:
            return
        self._pages_at = now
        cache = getattr(self.llm, "cache", None)
        try:
            free = int(cache.free_page_count())
            total = int(getattr(self.llm, "initial_free_pages", None) or free)
        except Exception:  # noqa: BLE001 - the engine may not expose its pool
            return
        self.snapshot["free_pages"], self.snapshot["total_pages"] = free, total
        self.metrics.set_pages(free, total)


def _put_all(items) -> None:
    for sink, delta in items:
        sink.put_nowait(delta)
