"""A multi-turn chat load against `dmc serve`: what prefix caching is for.

``--clients`` conversations run at once, each of ``--turns`` turns. Every conversation starts with the same system
prompt (``--system-tokens``) and its own first user message (``--turn-tokens``); each turn sends the whole history
so far (as chat clients and agents do), streams ``--gen-tokens`` tokens back (greedy, ignore_eos), and the next
turn's prompt is that history, the answer's length in tokens and a new user message. So from the second turn on,
all of a prompt but its last ``gen + turn`` tokens was sent before. Prompts are token ids: random ids of the
vocabulary, or windows of ``--prompt-text`` files tokenized by the model's tokenizer; the answer stands in the
history as ids of the same source (its length is what matters for the cache, not its words).

Measured: TTFT per turn (p50 over the conversations), the p50 of the later turns against the first, output
tokens/s, failures, and the server's prefix-cache counters where it exports them (``/metrics``). One row per run
in ``--results`` (JSON; a run with the same key replaces its row: GPU, model, prefix caching on or off, clients,
turns and token counts), and ``--report`` (Markdown) is written from all of them::

    python benchmarks/multiturn_load.py --model DIR --server-args "--enable-prefix-caching ..." \\
        --results docs/results/multiturn.json --report docs/results/multiturn.md

Compare the rows with and without ``--enable-prefix-caching`` in ``--server-args`` on the same GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import serve_load as sl  # noqa: E402

KEY = ("gpu", "model", "prefix_caching", "clients", "turns", "system_tokens", "turn_tokens", "gen_tokens")
# The server's prefix-cache counters (prompt tokens): reused from a snapshot, and queried (admitted with caching on).
PREFIX_METRICS = ("dmc_prefix_cache_hits_total", "dmc_prefix_cache_queries_total")


def conversation_sources(args) -> tuple[list[int], Callable[[int], list[int]]]:
    """The shared system prompt and a ``draw(n)`` of n more ids (random, or a window of --prompt-text at a random
    offset, wrapping around)."""
    rng = random.Random(args.seed)
    if args.prompt_text:
        stream = sl.text_tokens(args.prompt_text, args.tokenizer or args.model)

        def draw(n: int) -> list[int]:
            start = rng.randrange(len(stream))
            return [stream[(start + i) % len(stream)] for i in range(n)]
    else:
        def draw(n: int) -> list[int]:
            return [rng.randrange(args.min_token_id, args.vocab_size) for _ in range(n)]
    return draw(args.system_tokens), draw


async def conversation(client, model: str, system: list[int], draw, args, t0: float) -> list[dict]:
    """One conversation's turns, each a streamed completion of the whole history; a record per turn."""
    history = system + draw(args.turn_tokens)
    records = []
    for turn in range(args.turns):
        body = {"model": model, "prompt": history, "max_tokens": args.gen_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        record = await sl.one_request(client, body, t0)
        record["turn"] = turn
        records.append(record)
        if "error" in record:
            break
        history = history + draw(args.gen_tokens) + draw(args.turn_tokens)
    return records


async def run(args, url: str, model: str) -> dict:
    system, draw = conversation_sources(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with sl.httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout) as client:
        before = await sl.scrape_metrics(client)
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(conversation(client, model, system, draw, args, t0)
                                            for _ in range(args.clients)))
        duration = time.perf_counter() - t0
        after = await sl.scrape_metrics(client)
    records = [r for turns in per_client for r in turns]
    ok = [r for r in records if "error" not in r]
    ttft = {t: [r["stamps"][0][0] - r["start"] for r in ok if r["turn"] == t] for t in range(args.turns)}
    later = [v for t in range(1, args.turns) for v in ttft[t]]
    counters = {}
    for name in PREFIX_METRICS:
        a, b = sl.metric(before, name), sl.metric(after, name)
        counters[name] = None if a is None or b is None else b - a
    out_tokens = sum(r["max_tokens"] for r in ok)
    return {
        "requests": len(records), "failed": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if "error" in r})[:5],
        "ttft_p50_ms_by_turn": [None if not v else round(sl.percentile(v, 50) * 1e3, 3) for v in ttft.values()],
        "ttft_p50_ms_first_turn": None if not ttft[0] else round(sl.percentile(ttft[0], 50) * 1e3, 3),
        "ttft_p50_ms_later_turns": None if not later else round(sl.percentile(later, 50) * 1e3, 3),
        "output_tokens_per_s": round(out_tokens / duration, 2) if duration > 0 else 0.0,
        "duration_s": round(duration, 3), "prefix_cache": counters,
    }


def row_key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(k)) for k in KEY)


def record(path: pathlib.Path, row: dict) -> list[dict]:
    """Add ``row`` to the results file (replacing the row of the same key); returns all rows."""
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
    rows.sort(key=lambda r: tuple(str(r.get(k)) for k in KEY))
    path.parent.mkdir(parents=True, exist_ok=True)
    about = f"written by benchmarks/multiturn_load.py: one row per run; a run with the same ({', '.join(KEY)}) replaces it"
    path.write_text(json.dumps({"about": about, "rows": rows}, indent=1) + "\n")
    return rows


def table(rows: list[dict], results_name: str) -> str:
    lines = ["# Multi-turn chat load", "",
             f"Written by `benchmarks/multiturn_load.py` from `{results_name}`. Each conversation resends its whole "
             "history every turn (a shared system prompt, then its own turns); TTFT p50 over the conversations, "
             "greedy, every answer its full length.", "",
             "| GPU | model | prefix caching | clients x turns | system / turn / answer tokens | TTFT p50 ms, turn 1 "
             "| TTFT p50 ms, later turns | TTFT p50 ms by turn | output tok/s | prompt tokens from the prefix cache "
             "| failed | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pc = r.get("prefix_cache") or {}
        hits, queries = pc.get("dmc_prefix_cache_hits_total"), pc.get("dmc_prefix_cache_queries_total")
        cache = "-" if not queries else f"{hits:g} / {queries:g} ({hits / queries:.0%})"
        by_turn = ", ".join("-" if v is None else f"{v:.0f}" for v in r["ttft_p50_ms_by_turn"])
        lines.append(f"| {r['gpu']} | {r['model']} | {'on' if r['prefix_caching'] else 'off'} | {r['clients']} x "
                     f"{r['turns']} | {r['system_tokens']} / {r['turn_tokens']} / {r['gen_tokens']} | "
                     f"{sl._num(r['ttft_p50_ms_first_turn'])} | {sl._num(r['ttft_p50_ms_later_turns'])} | {by_turn} | "
                     f"{r['output_tokens_per_s']:,.0f} | {cache} | {r['failed']} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model directory: the script starts `dmc serve` on it")
    parser.add_argument("--server-args", default="", help="flags for the server it starts (one string)")
    parser.add_argument("--server-log", default="multiturn_server.log")
    parser.add_argument("--url", default=None, help="a running server instead of --model")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model", default=None, help="the model name the server answers to (default: asked)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--turn-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--prompt-text", nargs="+", default=None, metavar="PATH",
                        help="files or folders whose text (the model's tokenizer) makes the prompts; default random ids")
    parser.add_argument("--tokenizer", default=None, help="with --prompt-text and --url: the tokenizer directory")
    parser.add_argument("--vocab-size", type=int, default=32000, help="random ids below this (without --prompt-text)")
    parser.add_argument("--min-token-id", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--model-name", default=None, help="the model's name in the row (default: the directory's)")
    parser.add_argument("--device-name", default=None, help="the GPU's name in the row (default: this machine's)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--results", default=None, help="a JSON file of rows, one per run")
    parser.add_argument("--report", default=None, help="a Markdown file written from --results")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.url is None):
        parser.error("give --model DIR (the script starts the server) or --url of a running one")
    for flag in ("clients", "turns", "system_tokens", "turn_tokens", "gen_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.report and not args.results:
        parser.error("--report is written from --results: give both")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    server = None
    if args.model:
        server = sl.Server(args.model, args.server_args, args.server_log)
        server.wait_ready(1800)
    url = args.url or server.url
    try:
        model = args.served_model or sl.httpx.get(f"{url}/v1/models", timeout=30, headers={
            "Authorization": f"Bearer {args.api_key}"} if args.api_key else {}).json()["data"][0]["id"]
        result = asyncio.run(run(args, url, model))
    finally:
        if server is not None:
            server.stop()
    row = {"gpu": args.device_name or sl.device_name(server is not None),
           "model": args.model_name or pathlib.Path(args.model or model).name,
           "prefix_caching": "--enable-prefix-caching" in args.server_args.split(),
           "clients": args.clients, "turns": args.turns, "system_tokens": args.system_tokens,
           "turn_tokens": args.turn_tokens, "gen_tokens": args.gen_tokens, **result,
           "server_args": args.server_args, "prompts": "text" if args.prompt_text else "random",
           "date": time.strftime("%Y-%m-%d %H:%M"), "commit": args.commit or sl.git_commit() or "unknown"}
    print(json.dumps({k: v for k, v in row.items() if k != "errors"}), flush=True)
    if args.results:
        rows = record(pathlib.Path(args.results), row)
        if args.report:
            pathlib.Path(args.report).write_text(table(rows, sl.shown_path(args.results)))
    return row


if __name__ == "__main__":
    main()
