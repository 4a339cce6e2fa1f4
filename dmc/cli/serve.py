"""``dmc serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys

from ._checks import check_eviction, check_weights
from ._engine_args import add_engine_arguments, add_forced_cr_argument, describe_load_error, engine_config, load_errors

NAME = "serve"
HELP = ("serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, streaming, "
        "/health, /metrics) with continuous batching across clients")
HELP_DEFAULTS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--api-key", default=os.environ.get("DMC_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DMC_API_KEY, else none)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model directory's name)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds running requests get to finish before they are aborted")
    parser.add_argument("--max-body-mib", type=float, default=32.0, help="largest request body (413 above)")
    parser.add_argument("--seed", type=int, default=0, help="draws the seeds of requests that give none")
    parser.add_argument("--engine", default="process", choices=["process", "thread"],
                        help="where the engine runs: a process of its own (no interpreter lock shared with the HTTP "
                             "handlers) or a thread of the server's process")
    parser.add_argument("--warmup", default="auto", choices=["auto", "on", "off"],
                        help="before serving, compile the prefill attention of every prompt-length bucket and capture "
                             "the decode graphs (LLM.warmup), so that no request waits for a compilation; auto: on CUDA")
    add_forced_cr_argument(parser)
    # Serving: a step's decoding requests count against its tokens, so a wave of prompts is prefilled over
    # several steps instead of stalling hundreds of streams (vLLM's default for its API server).
    parser.set_defaults(max_num_batched_tokens=2048)
    parser.add_argument("--profile-steps", default=None, metavar="PATH",
                        help="at shutdown, write where the engine's steps spent their time (ms per step by section: "
                             "schedule, prefill, decode, postprocess, outputs, send) and the server's handling of "
                             "them, as JSON")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level (one line per request at info)")


def _check_port(host: str, port: int) -> None:
    """ValueError naming --port when ``host:port`` cannot be listened on (taken, or not ours to take),
    found by binding it for a moment before the model loads."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host} does not resolve ({exc.strerror}); give an address of this machine, e.g. "
                         "127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"--port {port}: address {host}:{port} is already in use (another server?); pick "
                                 "another --port or stop the process that holds it") from None
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); pick another "
                             "--port or --host") from None


def run(args: argparse.Namespace) -> int:
    try:
        _check_port(args.host, args.port)
    except ValueError as exc:
        print(f"dmc serve: {exc}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from ..serve import EngineLoop, EngineProcess, Metrics, ServerConfig, build_app
        from ..serve.engine_core import EngineSpec, build_llm
        from ..serve.engine_loop import EngineError
    except ImportError as exc:
        print(f"dmc serve: needs FastAPI and uvicorn ({exc}); pip install 'dmc[serve]'", file=sys.stderr)
        return 2

    try:
        config = engine_config(args, seed=args.seed, forced_period=args.forced_cr)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        if not args.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
        if not args.max_body_mib > 0:
            raise ValueError(f"--max-body-mib must be > 0, got {args.max_body_mib}")
        check_weights(args.model)
        check_eviction(args.model, args.eviction, args.vanilla, args.forced_cr)
    except ValueError as exc:
        print(f"dmc serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or os.path.basename(os.path.abspath(args.model))
    metrics = Metrics(name)
    spec = EngineSpec(args.model, config, warmup=args.warmup)
    if args.engine == "process":
        engine = EngineProcess(spec, metrics, log_level=args.log_level.upper())
    else:
        engine = EngineLoop(lambda: build_llm(spec), metrics)
    try:
        engine.start()
    except EngineError as exc:  # raised in the engine process: its type is known by name only
        if exc.kind not in {e.__name__ for e in load_errors()}:
            print(f"dmc serve: the engine did not start: {exc.kind}: {exc}", file=sys.stderr)
            return 3
        print(f"dmc serve: {describe_load_error(args.model, exc)}", file=sys.stderr)
        return 2
    except load_errors() as exc:
        print(f"dmc serve: {describe_load_error(args.model, exc)}", file=sys.stderr)
        return 2
    info = engine.info
    tokenizer = None
    if info["has_tokenizer"]:  # the server's own copy (prompts); the engine detokenizes with its own
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = ServerConfig(model_name=name, tokenizer=tokenizer, max_model_len=info["max_model_len"],
                          vocab_size=info["vocab_size"],
                          api_key=args.api_key, max_body_bytes=int(args.max_body_mib * 2**20))
    app = build_app(engine, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new requests at once
            config.draining = True
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                                   timeout_graceful_shutdown=args.shutdown_timeout))
    logging.getLogger("dmc.serve").info("serving %s as %r on http://%s:%d (max_model_len %d, %s pages free)",
                                        args.model, name, args.host, args.port, info["max_model_len"],
                                        engine.snapshot.get("free_pages"))
    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler found at start:
    # a SIGTERM that shut the server down cleanly ends the process with status 0 (SIGINT still exits 130).
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    server.run()
    engine.stop()
    profile = engine.profile()
    logging.getLogger("dmc.serve").info("engine time per step: %s", json.dumps(profile, separators=(",", ":")))
    if args.profile_steps:
        pathlib.Path(args.profile_steps).write_text(json.dumps(profile, indent=2) + "\n")
    return 0
