"""``dmc serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from ._engine_args import (add_engine_arguments, add_forced_cr_argument, check_forced_cr, describe_load_error,
                           engine_kwargs, load_errors)

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
    parser.add_argument("--warmup", default="auto", choices=["auto", "on", "off"],
                        help="before serving, compile the prefill attention of every prompt-length bucket and capture "
                             "the decode graphs (LLM.warmup), so that no request waits for a compilation; auto: on CUDA")
    add_forced_cr_argument(parser)
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

        from ..serve import EngineLoop, Metrics, ServerConfig, build_app
    except ImportError as exc:
        print(f"dmc serve: needs FastAPI and uvicorn ({exc}); pip install 'dmc[serve]'", file=sys.stderr)
        return 2
    from ..engine import LLM

    try:
        kwargs = engine_kwargs(args)
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        if not args.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
        if not args.max_body_mib > 0:
            raise ValueError(f"--max-body-mib must be > 0, got {args.max_body_mib}")
        check_forced_cr(args.forced_cr)
    except ValueError as exc:
        print(f"dmc serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or os.path.basename(os.path.abspath(args.model))
    metrics = Metrics(name)
    def make_llm():
        llm = LLM(args.model, progress=False, seed=args.seed, forced_period=args.forced_cr, **kwargs)
        if args.warmup == "on" or (args.warmup == "auto" and llm.device.type == "cuda"):
            start = time.perf_counter()
            done = llm.warmup()
            logging.getLogger("dmc.serve").info("warmed up in %.1f s: prompt lengths %s, decode graphs for batches %s",
                                                time.perf_counter() - start, done["prompt_lengths"],
                                                done["graph_buckets"])
        return llm

    engine = EngineLoop(make_llm, metrics)
    try:
        engine.start()
    except load_errors() as exc:
        print(f"dmc serve: {describe_load_error(args.model, exc)}", file=sys.stderr)
        return 2
    llm = engine.llm
    tokenizer = None
    if llm.tokenizer is not None:  # the server's own copy: the engine thread decodes with the engine's
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = getattr(getattr(getattr(llm, "model", None), "config", None), "vocab_size", None) or 2**31
    config = ServerConfig(model_name=name, tokenizer=tokenizer, max_model_len=llm.max_model_len, vocab_size=vocab,
                          api_key=args.api_key, max_body_bytes=int(args.max_body_mib * 2**20))
    app = build_app(engine, config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM/SIGINT: refuse new requests at once
            config.draining = True
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                                   timeout_graceful_shutdown=args.shutdown_timeout))
    logging.getLogger("dmc.serve").info("serving %s as %r on http://%s:%d (max_model_len %d, %s pages free)",
                                        args.model, name, args.host, args.port, llm.max_model_len,
                                        engine.snapshot.get("free_pages"))
    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler found at start:
    # a SIGTERM that shut the server down cleanly ends the process with status 0 (SIGINT still exits 130).
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    server.run()
    engine.stop()
    return 0
