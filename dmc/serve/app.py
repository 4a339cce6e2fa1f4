"""The FastAPI app: OpenAI routes, errors, auth, health and metrics, one log line per request.

Handlers tokenize, check and turn a request into engine requests (one per prompt and choice), give
them to the :class:`~dmc.serve.engine_loop.EngineLoop` and read their deltas from an asyncio
queue: non-streaming requests gather them into one response, streaming ones forward each as a
server-sent event and end with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.params import SamplingParams
from .engine_loop import Delta, EngineLoop, RequestHandle
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, OtherPart, unsupported

log = logging.getLogger("dmc.serve")


@dataclass
class ServerConfig:
    """What the routes need besides the engine loop."""

    model_name: str
    tokenizer: object | None  # the server's own copy, for prompts (the engine detokenizes with its own)
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    draining: bool = False  # set on SIGTERM: new /v1 requests get 503
    started: int = field(default_factory=lambda: int(time.time()))
    _pieces: dict = field(default_factory=dict, repr=False)

    def piece(self, token: int) -> str:
        """A token's text as log-probs show it (vLLM's ``token_id:N`` without a tokenizer); cached, since the
        top tokens of every position repeat."""
        text = self._pieces.get(token)
        if text is None:
            text = f"token_id:{token}" if self.tokenizer is None else self.tokenizer.decode([token])
            self._pieces[token] = text
        return text


def build_app(engine: EngineLoop, config: ServerConfig) -> FastAPI:
    """The ASGI app. The engine loop must be started; the app stops it at shutdown."""

    async def lifespan(app):
        yield
        config.draining = True
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="dmc OpenAI-compatible server", version="1", lifespan=lifespan)
    app.state.config, app.state.engine = config, engine
    tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dmc-tokenize")

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        error = validation_error(exc.errors(), config.vocab_size)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    app.add_middleware(_Gate, config=config)

    # ------------------------------------------------------------------ plain routes
    @app.get("/health")
    async def health():
        snapshot = dict(engine.snapshot)
        status = "ok" if engine.alive and not config.draining else "shutting down" if config.draining else "dead"
        return JSONResponse({"status": status, **snapshot}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": config.started,
                                            "owned_by": "dmc", "max_model_len": config.max_model_len}]}

    # ------------------------------------------------------------------ generation routes
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check(body, config)
        prompts = _prompt_list(body.prompt)
        prompt_ids = await _run(tokenize_pool, lambda: [_tokenize(p, config) for p in prompts])
        handles, sink = _handles(prompt_ids, body, body.max_tokens, config)
        echo = [_prompt_text(p, ids, config) for p, ids in zip(prompts, prompt_ids)] if body.echo else None
        render = _Render(config, prompt_ids, body.n, echo, body.logprobs is not None)
        return await _respond(request, body, prompt_ids, handles, sink, engine, "cmpl", "text_completion",
                              chat=False, render=render)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check(body, config)
        prompt_ids = await _run(tokenize_pool, lambda: [_chat_prompt(body, config)])
        handles, sink = _handles(prompt_ids, body, body.max_completion_tokens or body.max_tokens, config)
        render = _Render(config, prompt_ids, body.n, None, bool(body.logprobs))
        return await _respond(request, body, prompt_ids, handles, sink, engine, "chatcmpl", "chat.completion",
                              chat=True, render=render)

    return app


def validation_error(errors: list[dict], vocab_size: int) -> APIError:
    """One 400 for pydantic's errors of a request body: what is wrong and with which field, in the client's terms
    (a body that is no JSON; a prompt that is none of its accepted forms, each of which pydantic reports)."""
    first = errors[0] if errors else {}
    where = first.get("loc", ())
    if first.get("type") == "json_invalid":
        at = where[-1] if len(where) > 1 and isinstance(where[-1], int) else None
        detail = (first.get("ctx") or {}).get("error")
        return APIError(400, "the request body is not valid JSON" + (f" ({detail} at character {at})" if at is not None
                        and detail else f" (at character {at})" if at is not None else "")
                        + ": send one JSON object", code="invalid_json")
    fields = [[str(x) for x in e.get("loc", ()) if x != "body"] for e in errors]
    if fields and fields[0][:1] == ["prompt"]:
        about_prompt = [e for e, f in zip(errors, fields) if f[:1] == ["prompt"]]
        others = len(errors) - len(about_prompt)
        if any(e.get("type") in ("greater_than_equal", "less_than_equal") and e.get("loc", ())[-1:] != ("prompt",)
               and isinstance(e.get("input"), int) for e in about_prompt):
            message = f"prompt token ids must be in [0, {vocab_size})"
        else:
            message = "prompt must be text, a list of token ids, or a list (a batch) of either"
        return APIError(400, message + (f" (and {others} more problem(s))" if others else ""), param="prompt")
    loc = fields[0] if fields else []
    message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param=".".join(loc) or None)


# ---------------------------------------------------------------------- request → engine requests
async def _run(pool, fn):
    return await asyncio.get_running_loop().run_in_executor(pool, fn)


def _check(body, config: ServerConfig) -> None:
    if body.model != config.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {config.model_name!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    error = unsupported(body)
    if error is not None:
        raise error


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty: give text, token ids, or a non-empty batch of either", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _tokenize(prompt, config: ServerConfig) -> list[int]:
    if isinstance(prompt, str):
        if config.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: give prompts as token ids", param="prompt")
        ids = config.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = list(prompt)
        if any(t >= config.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {config.vocab_size})", param="prompt")
    if not ids:
        raise APIError(400, "empty prompt: give at least one token", param="prompt")
    return ids


def _chat_prompt(body: ChatCompletionRequest, config: ServerConfig) -> list[int]:
    tokenizer = config.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template, so /v1/chat/completions cannot build a "
                            "prompt; use /v1/completions, or add a chat_template to tokenizer_config.json",
                       param="messages", code="no_chat_template")
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            if any(isinstance(part, OtherPart) for part in content):
                raise APIError(400, "only text content parts are supported (this model reads text)",
                               param=f"messages.{i}.content")
            content = "".join(part.text for part in content)
        messages.append({"role": message.role, "content": content or "",
                         **({"name": message.name} if message.name else {})})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                             tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja raise_exception, bad roles: the client's messages
        raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "the chat template gave an empty prompt", param="messages")
    return ids


def _prompt_text(prompt, ids: list[int], config: ServerConfig) -> str:
    """What ``echo`` puts before the completion: the prompt as given, or its token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    return "" if config.tokenizer is None else config.tokenizer.decode(ids)


def _logprob_params(body) -> tuple[int | None, int | None]:
    """``(logprobs, prompt_logprobs)`` of the engine (:class:`SamplingParams`) for an OpenAI request: chat's
    ``logprobs: true`` + ``top_logprobs: k``; completions' ``logprobs: k``, with ``echo`` for the prompt's too
    (``max_tokens: 0`` with ``echo``: the prompt is scored, nothing generated)."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None, None
    prompt = body.logprobs if body.echo else None
    if body.max_tokens == 0 and prompt is None:
        prompt = 0  # the engine prefills without generating only to score: echo without logprobs shows none
    return body.logprobs, prompt


def _handles(prompt_ids: list[list[int]], body, max_tokens: int | None, config: ServerConfig):
    """One engine request per (prompt, choice), checked against the context; they share one queue. A prompt's
    later choices fork its first (one prefill: :meth:`dmc.LLM.add_request`'s ``fork_of``)."""
    loop = asyncio.get_running_loop()
    sink: asyncio.Queue = asyncio.Queue()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    logprobs, prompt_logprobs = _logprob_params(body)
    handles = []
    for p, ids in enumerate(prompt_ids):
        room = config.max_model_len - len(ids)
        wanted = max_tokens if max_tokens is not None else room
        if room < 1 or wanted > room:
            raise APIError(400, f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                                f"requested {len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} for the "
                                "completion). Please reduce the prompt or max_tokens.",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j + 2**63) % 2**64 - 2**63
            params = SamplingParams(max_tokens=wanted, temperature=1.0 if body.temperature is None else body.temperature,
                                    top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p, seed=seed,
                                    stop=stop, stop_token_ids=list(body.stop_token_ids or []),
                                    ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            try:
                params.validate()
            except ValueError as exc:
                raise APIError(400, str(exc)) from exc
            handles.append(RequestHandle(p * body.n + j, ids, params, sink, loop,
                                         fork_of=handles[p * body.n].key if j else None))
    return handles, sink


# ---------------------------------------------------------------------- engine deltas → HTTP
class _Choices:
    """The choices of one HTTP request as their deltas arrive."""

    def __init__(self, handles: list[RequestHandle], prompt_ids: list[list[int]]) -> None:
        self.handles = handles
        self.prompts = sum(len(ids) for ids in prompt_ids)  # once per prompt, whatever n
        self.text = {h.index: [] for h in handles}
        self.token_ids = {h.index: [] for h in handles}
        self.logprobs = {h.index: [] for h in handles}
        self.prompt_logprobs: dict[int, list] = {}
        self.final: dict[int, Delta] = {}
        self.completed = False  # a stream sent all it had to (its client did not leave first)

    def add(self, delta: Delta) -> None:
        self.text[delta.index].append(delta.text)
        self.token_ids[delta.index].extend(delta.token_ids)
        self.logprobs[delta.index].extend(delta.logprobs or [])
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[delta.index] = delta.prompt_logprobs
        if delta.finished:
            self.final[delta.index] = delta

    @property
    def done(self) -> bool:
        return len(self.final) == len(self.handles)

    def error(self) -> APIError | None:
        for delta in self.final.values():
            if delta.finish_reason == "shutdown":
                return APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
            if delta.finish_reason == "unavailable":
                return APIError(503, delta.error or "the engine is not running", code="engine_unavailable")
            if delta.finish_reason == "error":
                status = 500 if (delta.error or "").startswith("engine error") else 400
                return APIError(status, delta.error or "the engine refused this request")
        return None

    def usage(self) -> dict:
        completion = sum(d.completion_tokens for d in self.final.values())
        return {"prompt_tokens": self.prompts, "completion_tokens": completion,
                "total_tokens": self.prompts + completion}

    def compression(self) -> dict | None:
        stats = [d.compression for d in self.final.values() if d.compression]
        if not stats:
            return None
        # Each request's cr = its tokens x (layer, KV head) pairs / its slots: the overall figure is
        # the ratio of the sums, sum(cr x slots) / sum(slots).
        slots = sum(c["slots"] for c in stats)
        return {"cr": sum(c["cr"] * c["slots"] for c in stats) / slots if slots else None, "slots": slots}

    def log_fields(self) -> dict:
        reasons = sorted({d.finish_reason for d in self.final.values()})
        compression = self.compression()
        ttfts = [h.first_token_at - h.arrival for h in self.handles if h.first_token_at is not None]
        return {"choices": len(self.handles), **self.usage(), "finish": ",".join(reasons) or "-",
                "cr": f"{compression['cr']:.2f}" if compression and compression["cr"] else "-",
                "ttft": f"{min(ttfts):.3f}s" if ttfts else "-"}


async def _respond(request: Request, body, prompt_ids, handles, sink, engine: EngineLoop, prefix: str, object_: str,
                   chat: bool, render: "_Render"):
    rid = f"{prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    choices = _Choices(handles, prompt_ids)
    request.state.dmc = {"id": rid}
    engine.submit(handles)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(rid, created, body.model, object_ + (".chunk" if chat else ""), chat, include_usage,
                         choices, sink, request, render)
        return _SSE(events, on_close=lambda: _close_stream(request, engine, choices))
    watcher = asyncio.create_task(_watch_disconnect(request, sink))
    try:
        while not choices.done:
            delta = await sink.get()
            if delta is None:  # the client went away: nobody to answer
                _abort_unfinished(engine, choices)
                request.state.dmc.update(finish="client gone")
                return Response(status_code=499)
            choices.add(delta)
    finally:
        watcher.cancel()
        _abort_unfinished(engine, choices)
    request.state.dmc.update(choices.log_fields())
    error = choices.error()
    if error is not None:
        raise error
    out = []
    for index in sorted(choices.final):
        final = choices.final[index]
        text = "".join(choices.text[index])
        ids, entries = choices.token_ids[index], choices.logprobs[index]
        choice = {"index": index, "finish_reason": final.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if render.logprobs:
                choice["logprobs"] = {"content": render.chat_logprobs(ids, entries)}
        else:
            choice["text"] = render.echo_text(index) + text
            choice["token_ids"] = ids
            if render.logprobs:
                choice["logprobs"] = render.completion_logprobs(index, ids, entries, choices.prompt_logprobs.get(index))
        choice["dmc_compression"] = final.compression
        out.append(choice)
    return {"id": rid, "object": object_, "created": created, "model": body.model, "choices": out,
            "usage": choices.usage(), "dmc_compression": choices.compression()}


def _close_stream(request: Request, engine: EngineLoop, choices: _Choices) -> None:
    """However a stream ended: abort what still runs; a stream its client left is logged as a non-streaming
    request its client left is (499, finish=client gone)."""
    if not choices.completed:
        request.state.dmc.update(choices.log_fields(), finish="client gone", status=499)
    _abort_unfinished(engine, choices)


def _abort_unfinished(engine: EngineLoop, choices: _Choices) -> None:
    left = [h for h in choices.handles if h.index not in choices.final]
    if left:
        engine.abort(left)


async def _watch_disconnect(request: Request, sink: asyncio.Queue, every: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    sink.put_nowait(None)


async def _stream(rid, created, model, object_, chat, include_usage, choices: _Choices, sink, request,
                  render: "_Render"):
    def event(choice_list, usage=False, **extra) -> str:
        chunk = {"id": rid, "object": object_, "created": created, "model": model, "choices": choice_list, **extra}
        if include_usage:
            chunk["usage"] = choices.usage() if usage else None
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

    while not choices.done:
        delta = await sink.get()
        if delta is None:
            continue
        choices.add(delta)
        if delta.finish_reason in ("error", "shutdown", "unavailable"):
            error = choices.error()
            yield f"data: {json.dumps(error.body())}\n\n"
            continue
        if delta.finish_reason == "aborted":
            continue
        choice = {"index": delta.index, "logprobs": None,
                  "finish_reason": delta.finish_reason if delta.finished else None}
        if chat:
            if not (delta.text or delta.first or delta.finished or (render.logprobs and delta.token_ids)):
                continue  # nothing a chat client can show (text held back)
            choice["delta"] = ({"role": "assistant", "content": delta.text} if delta.first
                               else {"content": delta.text} if delta.text else {})
            if render.logprobs:
                choice["logprobs"] = {"content": render.chat_logprobs(delta.token_ids, delta.logprobs or [])}
        else:
            choice["text"] = (render.echo_text(delta.index) if delta.first else "") + delta.text
            choice["token_ids"] = delta.token_ids
            if render.logprobs:
                choice["logprobs"] = render.completion_logprobs(delta.index, delta.token_ids, delta.logprobs or [],
                                                                delta.prompt_logprobs)
        if delta.finished:
            choice["dmc_compression"] = delta.compression
        yield event([choice])
    request.state.dmc.update(choices.log_fields())
    if include_usage:
        yield event([], usage=True, dmc_compression=choices.compression())
    yield "data: [DONE]\n\n"
    choices.completed = True


class _Render:
    """The OpenAI forms of echo and log-probs for one HTTP request's choices (``index`` = prompt x n + choice).

    Completions: ``{tokens, token_logprobs, top_logprobs, text_offset}``; ``top_logprobs`` maps the k most
    likely tokens' text to their log-prob, plus the chosen token's (as vLLM does), and ``text_offset`` counts
    the characters of the tokens before (the echoed prompt's included), continuing across a stream's chunks.
    With echo the prompt's tokens come first, the first one with null log-probs. Chat: ``content`` =
    ``[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]``."""

    def __init__(self, config: ServerConfig, prompt_ids: list[list[int]], n: int, echo: list[str] | None,
                 logprobs: bool) -> None:
        self.config, self.prompt_ids, self.n, self.echo, self.logprobs = config, prompt_ids, n, echo, logprobs
        self.offsets: dict[int, int] = {}  # choice -> characters of the tokens it has shown

    def echo_text(self, index: int) -> str:
        return "" if self.echo is None else self.echo[index // self.n]

    def completion_logprobs(self, index: int, ids: list[int], entries: list, prompt: list | None) -> dict:
        if self.echo is not None and prompt is not None:
            ids, entries = self.prompt_ids[index // self.n] + list(ids), prompt + list(entries)
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self.offsets.get(index, 0)
        for token, entry in zip(ids, entries):
            piece = self.config.piece(token)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            if entry is None:  # a prompt's first token: nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.config.piece(t): lp for t, lp in entry.top}
            top.setdefault(piece, entry.logprob)
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
        self.offsets[index] = offset
        return out

    def chat_logprobs(self, ids: list[int], entries: list) -> list[dict]:
        def one(token: int, logprob: float) -> dict:
            piece = self.config.piece(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return [{**one(token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
                for token, entry in zip(ids, entries)]


class _SSE(StreamingResponse):
    """Server-sent events whose engine requests are aborted however the response ends (finished,
    client disconnected, server cancelled it)."""

    def __init__(self, events, on_close) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


# ---------------------------------------------------------------------- middleware
class _Gate:
    """Pure ASGI middleware (streaming-safe): for /v1 routes 503 while draining, 401 without the
    API key, 413 for an oversized body; and one log line per request when its response ends."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        scope.setdefault("state", {})

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            fields = dict(scope["state"].get("dmc") or {})
            shown = fields.pop("status", None) or status[0] or "-"  # a stream its client left: 499, as a plain one
            line = " ".join(f"{k}={v}" for k, v in fields.items())
            level = logging.DEBUG if path in ("/health", "/metrics") else logging.INFO
            log.log(level, "%s %s %s %.3fs %s", scope["method"], path, shown, time.perf_counter() - start, line)

    def _refuse(self, scope) -> APIError | None:
        if not scope["path"].startswith("/v1/"):
            return None
        config = self.config
        if config.draining:
            return APIError(503, "the server is shutting down", code="shutting_down")
        headers = dict(scope["headers"])
        if config.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {config.api_key}":
                return APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return APIError(413, f"request body of {int(length)} bytes is over the server's limit of "
                                 f"{config.max_body_bytes}", code="request_too_large")
        return None
