"""Load generator for `dmc serve`: N concurrent streaming clients with a mix of prompt and generation
lengths; reports throughput, time to first token (TTFT) and inter-token latency (ITL) percentiles and
the server's peak concurrency (polled from /metrics), naming the device.

    # start the server itself (on this machine), load it, stop it:
    python benchmarks/serve_load.py --model DIR --server-args "--max-num-seqs 256" \\
        --clients 64 --requests 256 --prompt-lens 128,512,2048 --gen-lens 64,256 \\
        --label "DMC 4x" --out docs/benchmarks.md
    # random weights (e.g. the Llama-2-7B shape of benchmarks/throughput.py): add --forced-cr R to
    # --server-args so that every head compresses at CR R, as `dmc bench --forced-cr` does.
    # or load a server that runs already:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --out result.json

``--out`` ending in .md writes (or replaces) the section named after ``--label`` in that Markdown
file (docs/benchmarks.md: one section per run, e.g. vanilla and DMC at the same --kv-cache-memory-gib);
anything else gets JSON. Prompts are random token ids (ids below the model's vocabulary) or, with
``--prompt-text PATH...``, windows of those text files tokenized by the model's tokenizer (a DMC model
compresses random ids far less than text like its training data); generation runs to its length
(``ignore_eos``), greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    s = sorted(values)
    return {f"p{p}": s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))] for p in ps}


def device_name(model_started: bool) -> str:
    try:
        import torch
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            return f"{torch.cuda.get_device_name()}" + (f" (x{n} visible)" if n > 1 else "")
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores" + ("" if model_started else " (client host)")


class Server:
    """``dmc serve MODEL --port P ARGS`` as a child process."""

    def __init__(self, model: str, args: str, log_path: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "dmc.cli.main", "serve", model, "--port", str(self.port), *shlex.split(args)]
        print("starting:", " ".join(cmd), f"(log: {log_path})", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server did not answer /health within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def metric(text: str, name: str) -> float | None:
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    start = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    finish, error = None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    continue
                if not chunk["choices"]:
                    continue
                choice = chunk["choices"][0]
                n = len(choice.get("token_ids") or []) or (1 if choice["text"] else 0)
                if n:
                    stamps.append((time.perf_counter(), n))
                finish = choice["finish_reason"] or finish
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if error or not stamps:
        return {"error": error or "no tokens"}
    end = stamps[-1][0]
    itl = [(t1 - t0) / n for (t0, _), (t1, n) in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0][0] - start, "itl": itl, "e2e": end - start, "tokens": sum(n for _, n in stamps),
            "prompt_tokens": len(body["prompt"]), "finish_reason": finish}


def text_tokens(paths: list[str], tokenizer_dir: str) -> list[int]:
    """The token ids of the text files under ``paths`` (files, or folders read recursively in sorted order: every
    file that reads as UTF-8, the others skipped), one stream with a newline after each file, tokenized by the
    model's tokenizer."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    files = sorted(f for p in map(pathlib.Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    ids: list[int] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]  # a newline between files
    if not ids:
        raise SystemExit(f"--prompt-text: no text found under {' '.join(paths)}")
    return ids


def text_prompts(args, rng: random.Random, lengths: list[int]) -> list[list[int]]:
    """One prompt per length: a window of the --prompt-text token stream at a random offset."""
    stream = text_tokens(args.prompt_text, args.tokenizer or args.model)
    if len(stream) < max(lengths):
        raise SystemExit(f"--prompt-text holds {len(stream)} tokens, fewer than the longest prompt ({max(lengths)})")
    starts = [rng.randrange(len(stream) - n + 1) for n in lengths]
    return [stream[s:s + n] for s, n in zip(starts, lengths)]


async def run_load(args, url: str, model: str) -> dict:
    rng = random.Random(args.seed)
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    gen_lens = [int(x) for x in args.gen_lens.split(",")]
    prompts, gens = [], []
    for _ in range(args.requests):  # random ids: drawn in this order, so a --seed gives the mix of earlier runs
        n = rng.choice(prompt_lens)
        prompts.append([n] if args.prompt_text else [rng.randrange(args.min_token_id, args.vocab_size)
                                                      for _ in range(n)])
        gens.append(rng.choice(gen_lens))
    if args.prompt_text:
        prompts = text_prompts(args, rng, [p[0] for p in prompts])
    bodies = [{"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
               "stream": True} for prompt, gen in zip(prompts, gens)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:
        for body in bodies[:args.warmup]:  # first calls compile / warm caches; not measured
            await one_request(client, {**body, "max_tokens": min(body["max_tokens"], 8)})
        before = (await client.get("/metrics")).text
        queue = list(enumerate(bodies))
        results: list[dict | None] = [None] * len(bodies)
        running_seen, pages_used = [], []
        done = asyncio.Event()

        async def worker() -> None:
            while queue:
                i, body = queue.pop(0)
                results[i] = await one_request(client, body)

        async def poll() -> None:
            while not done.is_set():
                try:
                    text = (await client.get("/metrics", timeout=10)).text
                    running_seen.append(metric(text, "dmc_requests_running") or 0)
                    pages_used.append(metric(text, "dmc_kv_pages_used") or 0)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(args.poll)

        poller = asyncio.create_task(poll())
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        done.set()
        await poller
        after = (await client.get("/metrics")).text
    ok = [r for r in results if r and "error" not in r]
    failed = [r for r in results if not r or "error" in r]
    out_tokens = sum(r["tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)

    def delta(name):
        a, b = metric(before, name), metric(after, name)
        return None if a is None or b is None else b - a

    itl = [x for r in ok for x in r["itl"]]
    return {
        "requests": len(bodies), "completed": len(ok), "failed": len(failed),
        "errors": sorted({r["error"] for r in failed if r})[:5],
        "clients": args.clients, "prompt_lens": prompt_lens, "gen_lens": gen_lens, "wall_s": wall,
        "prompts": "windows of " + " ".join(args.prompt_text) if args.prompt_text else "random token ids",
        "output_tokens_per_s": out_tokens / wall, "total_tokens_per_s": (out_tokens + in_tokens) / wall,
        "requests_per_s": len(ok) / wall, "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "ttft_s": percentiles([r["ttft"] for r in ok]), "itl_s": percentiles(itl),
        "e2e_s": percentiles([r["e2e"] for r in ok]),
        "peak_running_polled": max(running_seen, default=None),
        "peak_running_server": metric(after, "dmc_requests_running_peak"),
        "peak_kv_pages_used": max(pages_used, default=None), "kv_pages_total": metric(after, "dmc_kv_pages_total"),
        "realized_cr": metric(after, "dmc_realized_compression_ratio"),
        "preemptions": delta("dmc_preemptions_total"),
    }


def markdown(result: dict, meta: dict) -> str:
    ms = lambda d: " / ".join("-" if v is None else f"{v * 1000:.1f}" for v in d.values())  # noqa: E731
    cr = result["realized_cr"]
    return "\n".join([
        f"### Serving load: {meta['label']}",
        "",
        f"`benchmarks/serve_load.py` on **{meta['device']}**, {meta['date']}; model `{meta['model']}`, server "
        f"args `{meta['server_args'] or '-'}`; {result['clients']} concurrent streaming clients, "
        f"{result['requests']} requests, prompt lengths {result['prompt_lens']}, generation lengths "
        f"{result['gen_lens']} (uniform mix, greedy, ignore_eos); prompts: {result.get('prompts', 'random token ids')}.",
        "",
        "| output tok/s | total tok/s | req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | e2e p50/p90/p99 ms "
        "| peak running | peak KV pages | realized CR | preemptions | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {result['output_tokens_per_s']:.0f} | {result['total_tokens_per_s']:.0f} | {result['requests_per_s']:.2f} "
        f"| {ms(result['ttft_s'])} | {ms(result['itl_s'])} | {ms(result['e2e_s'])} "
        f"| {result['peak_running_polled']:.0f} (server: {result['peak_running_server']:.0f}) "
        f"| {result['peak_kv_pages_used']:.0f} of {result['kv_pages_total']:.0f} "
        f"| {'-' if cr is None else f'{cr:.2f}'} | {result['preemptions'] or 0:.0f} | {result['failed']} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8000)")
    target.add_argument("--model", help="start `dmc serve MODEL` here (a free port), load it, stop it")
    parser.add_argument("--server-args", default="", help="more `dmc serve` flags, one string (with --model)")
    parser.add_argument("--server-log", default="serve_load_server.log", help="the started server's output")
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for the server")
    parser.add_argument("--api-key", default=os.environ.get("DMC_API_KEY"), help="the server's key, if any")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=256, help="requests in all (clients take the next one)")
    parser.add_argument("--prompt-lens", default="128,512,2048", help="prompt lengths in tokens, drawn uniformly")
    parser.add_argument("--gen-lens", default="64,256", help="generation lengths in tokens, drawn uniformly")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="prompt ids are drawn below it (default: the model's config.json with --model, else 1000)")
    parser.add_argument("--min-token-id", type=int, default=3, help="lowest prompt id (skip special tokens)")
    parser.add_argument("--prompt-text", nargs="+", default=None, metavar="PATH",
                        help="prompts are windows of these text files / folders (tokenized by --tokenizer) instead of "
                             "random ids: a DMC model compresses text like its training data far more than random ids")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --prompt-text (default: --model)")
    parser.add_argument("--warmup", type=int, default=2, help="short unmeasured requests first")
    parser.add_argument("--timeout", type=float, default=3600, help="per-request timeout in seconds")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between /metrics polls")
    parser.add_argument("--seed", type=int, default=0, help="draws the request mix")
    parser.add_argument("--label", default=None, help="names the run (and its section in a .md --out)")
    parser.add_argument("--device-name", default=None, help="the server's device (default: detected here)")
    parser.add_argument("--out", default=None, help="a .md file (a section per --label) or a JSON file")
    args = parser.parse_args()
    if args.prompt_text and not (args.tokenizer or args.model):
        parser.error("--prompt-text needs --tokenizer DIR with --url (with --model the model's tokenizer is used)")
    if args.vocab_size is None:
        args.vocab_size = 1000
        if args.model and (pathlib.Path(args.model) / "config.json").is_file():
            args.vocab_size = json.loads((pathlib.Path(args.model) / "config.json").read_text())["vocab_size"]

    server = None
    if args.model:
        server = Server(args.model, args.server_args, args.server_log)
    try:
        url = server.url if server else args.url.rstrip("/")
        if server:
            server.wait_ready(args.startup_timeout)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        result = asyncio.run(run_load(args, url, model))
    finally:
        if server:
            server.stop()
    meta = {"label": args.label or model, "model": args.model or model, "url": None if server else url,
            "server_args": args.server_args if server else None,
            "device": args.device_name or device_name(server is not None),
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(shlex.quote(a) for a in sys.argv)}
    print(json.dumps({"meta": meta, **result}, indent=1))
    print(markdown(result, meta))
    if args.out:
        if args.out.endswith(".md"):
            from _report import write_section
            slug = re.sub(r"[^a-z0-9]+", "-", meta["label"].lower()).strip("-")
            write_section(args.out, f"serve_load-{slug}", markdown(result, meta) + f"\n\nCommand: `{meta['command']}`")
        else:
            pathlib.Path(args.out).write_text(json.dumps({"meta": meta, **result}, indent=1))
        print(f"written to {args.out}")
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
