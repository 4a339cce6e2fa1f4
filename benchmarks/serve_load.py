"""Load generator for `dmc serve`: streaming completions at a fixed concurrency (N clients) or at Poisson
arrivals of a given request rate (a list of rates: a sweep, one server start for all of it); reports throughput,
TTFT, TPOT, ITL and end-to-end latency percentiles, goodput under SLOs, the realized compression and the server's
peak concurrency (polled from /metrics), naming the device.

    # start the server itself (on this machine), load it with 64 clients, stop it:
    python benchmarks/serve_load.py --model DIR --server-args "--max-num-seqs 256" \\
        --clients 64 --requests 256 --prompt-lens 128,512,2048 --gen-lens 64,256 \\
        --label "DMC 4x" --out docs/benchmarks.md
    # a Poisson sweep (one server start, one run per rate), recorded as rows of docs/results/serving.json
    # and the table of the `## Serving` section of docs/benchmarks.md:
    python benchmarks/serve_load.py --model DIR --server-args "--kv-cache-memory-gib 1" \\
        --request-rate 2 4 8 16 inf --requests 256 --goodput ttft:2000 tpot:50 --model-name SmolLM2-135M \\
        --results docs/results/serving.json --report docs/benchmarks.md
    # random weights (e.g. the Llama-2-7B shape of benchmarks/throughput.py): add --forced-cr R to
    # --server-args so that every head compresses at CR R, as `dmc bench --forced-cr` does.
    # or load a server that runs already (say what it serves: --method, --target-cr, --kv-cache-gib):
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY --method dmc --target-cr 4 ...
    # rewrite the table from the JSON (after merging rows recorded elsewhere, e.g. on a GPU machine):
    python benchmarks/serve_load.py --render-only --merge OTHER.json \\
        --results docs/results/serving.json --report docs/benchmarks.md

Metrics (the conventions of vLLM's `benchmarks/benchmark_serving.py` / `vllm bench serve`), per request, on the
client's clock from sending the request: TTFT = time to the first generated token; e2e = time to the last one;
TPOT = (e2e - TTFT) / (output tokens - 1) (requests of one token have none; for goodput they count 0); ITL = every
gap between two tokens (a chunk of n tokens after a gap g gives n gaps of g / n). Percentiles p50/p90/p99 by
linear interpolation (numpy's default). Throughput = tokens / the run's duration (first send to last token).
Goodput = completed requests per second that meet every SLO (``--goodput ttft:2000 tpot:50``, ms; e2el too).
A run "meets the SLOs" when nothing failed and the p99 of each SLO metric is within its limit; the summary names
the highest rate of a sweep that did. ``--request-rate inf`` sends every request at once; a finite rate draws
inter-arrival times from a gamma distribution of shape ``--burstiness`` (1: exponential, i.e. Poisson arrivals)
and mean 1 / rate, seeded by ``--seed``; ``--max-concurrency`` caps the requests in flight.

The request mix is drawn once (``--seed``) and each run of a sweep sends the same requests. Every request runs to
its length (``ignore_eos``, greedy) and completes or is counted failed (its error kept); a request that completed
with fewer tokens than asked is counted in ``short_outputs``.

Prompts are random token ids (ids below the model's vocabulary) or, with ``--prompt-text PATH...``, windows of
those text files tokenized by the model's tokenizer (a DMC model compresses random ids far less than text like its
training data).

Outputs. ``--out`` ending in .md writes (or replaces) the section named after ``--label`` in that Markdown file
(one section per run); anything else gets JSON (``--save-detailed``: with every request's timestamps).
``--results PATH.json`` records one row per run (``ROW_FIELDS``; the row of a run with the same ``ROW_KEY``
is replaced, so re-running a run replaces its row, and the table shows the latest numbers with the commit
that produced them: git keeps the history) and ``--report PATH.md`` rewrites the table block under the
``## Serving`` heading of that file from all the rows (the rest of the file is kept).
``method`` / ``target_cr`` of a row: ``--method`` / ``--target-cr`` when given, else derived with ``--model``
from ``--server-args`` (``--vanilla``: vanilla, CR 1; ``--forced-cr R``: dmc, CR R; ``--eviction X``: X) and
then the model's config.json (a DMC model: dmc at its ``dmc.target_cr``; a plain one: vanilla, CR 1); a flag
that contradicts the server args is refused. ``kv_cache_gib``: ``--kv-cache-gib``, else the server's
``--kv-cache-memory-gib``. ``realized_cr``: the slot-weighted CR of the run's responses (``dmc_compression``),
else the server's ``dmc_realized_compression_ratio`` gauge. ``commit``: ``--commit``, else ``git rev-parse
--short HEAD`` of this checkout (``+dirty`` when dmc/ or benchmarks/ differ from it), else "unknown".
``pages_returned``: whether every KV page was back on the server's free list once the run was over (its
``dmc_kv_pages_used`` gauge back at 0 within two seconds; None if the server does not report it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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

REPO = pathlib.Path(__file__).resolve().parents[1]
SLO_METRICS = ("ttft", "tpot", "e2el")
DEFAULT_SLOS = ["ttft:2000", "tpot:50"]  # ms: the serving target's TTFT p99 <= 2 s and TPOT p99 <= 50 ms
METHODS = ("vanilla", "dmc", "h2o", "tova")
# A row of --results: these fields, in this order.
ROW_FIELDS = (
    "gpu", "model", "method", "target_cr", "realized_cr", "kv_cache_gib", "prompts", "prompt_lens", "gen_lens",
    "clients", "request_rate", "max_concurrency", "burstiness", "requests", "completed", "failed", "short_outputs",
    "duration_s", "output_tokens_per_s", "total_tokens_per_s", "requests_per_s",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "e2el_p50_ms", "e2el_p99_ms",
    "goodput_rps", "slo", "slo_met", "peak_running", "preemptions", "pages_returned", "seed", "server_args", "date",
    "commit",
)
# Rows with equal values of these fields are the same run: recording one replaces the other.
ROW_KEY = ("gpu", "model", "method", "target_cr", "kv_cache_gib", "prompts", "prompt_lens", "gen_lens",
           "clients", "request_rate", "max_concurrency", "burstiness")
MD_BEGIN, MD_END, MD_HEADING = "<!-- serve_load-table:begin -->", "<!-- serve_load-table:end -->", "## Serving"


# ---------------------------------------------------------------------- pure functions
def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile by linear interpolation between the closest ranks (numpy's default method)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    return {f"p{p}": percentile(values, p) for p in ps}


def arrival_times(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """Send times (s from the start) of ``n`` requests at ``rate`` requests/s: the first at 0, then gaps drawn
    from a gamma distribution of shape ``burstiness`` and mean 1 / rate (shape 1: exponential gaps, i.e. a
    Poisson process). ``rate`` inf: all at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, theta)
    return times


def parse_rate(text: str) -> float:
    """A request rate: a number > 0 or inf."""
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"a request rate is a number > 0 or inf, got {text!r}") from None
    if not rate > 0:
        raise ValueError(f"a request rate is a number > 0 or inf, got {text!r}")
    return rate


def parse_slos(items: list[str]) -> dict[str, float]:
    """``["ttft:2000", "tpot:50"]`` -> {"ttft": 2000.0, "tpot": 50.0} (ms); metrics ttft, tpot, e2el."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: the limit is a number of milliseconds") from None
        if not limit > 0 or math.isinf(limit):
            raise ValueError(f"--goodput {item!r}: the limit must be a finite number of ms > 0")
        slos[name] = limit
    return slos


def slo_text(slos: dict[str, float]) -> str:
    return " ".join(f"{k}:{v:g}" for k, v in slos.items())


def parse_lens(text: str, flag: str) -> list[int]:
    try:
        lens = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated token counts, e.g. 128,512, got {text!r}") from None
    if not lens or min(lens) < 1:
        raise ValueError(f"{flag} takes token counts >= 1, got {text!r}")
    return lens


def request_metrics(record: dict) -> dict:
    """TTFT, e2e, TPOT (s), ITL gaps and the output token count of one request from its chunk timestamps
    (``start``: when it was sent; ``stamps``: [time, tokens in the chunk] of every chunk that carried tokens)."""
    stamps, start = record["stamps"], record["start"]
    tokens = sum(n for _, n in stamps)
    ttft = stamps[0][0] - start
    e2e = stamps[-1][0] - start
    itl = [(t1 - t0) / n for (t0, _), (t1, n) in zip(stamps, stamps[1:]) for _ in range(n)]
    tpot = (e2e - ttft) / (tokens - 1) if tokens > 1 else None
    return {"ttft": ttft, "e2e": e2e, "tpot": tpot, "itl": itl, "tokens": tokens}


def meets_slos(metrics: dict, slos: dict[str, float]) -> bool:
    """Whether one request meets every SLO (ms); a one-token request's TPOT counts as 0."""
    values = {"ttft": metrics["ttft"], "tpot": metrics["tpot"] or 0.0, "e2el": metrics["e2e"]}
    return all(values[name] * 1000 <= limit for name, limit in slos.items())


def goodput(metrics: list[dict], slos: dict[str, float], duration: float) -> float:
    """Completed requests per second that meet every SLO (``metrics``: the completed requests')."""
    return sum(meets_slos(m, slos) for m in metrics) / duration if duration > 0 else 0.0


def summarize(records: list[dict], duration: float, slos: dict[str, float]) -> dict:
    """The run's counts, throughput, latency percentiles (s), goodput and SLO verdict from its request records."""
    ok = [r for r in records if "error" not in r]
    failed = [r for r in records if "error" in r]
    m = [request_metrics(r) for r in ok]
    out_tokens = sum(x["tokens"] for x in m)
    in_tokens = sum(r["prompt_tokens"] for r in ok)
    lat = {"ttft_s": percentiles([x["ttft"] for x in m]),
           "tpot_s": percentiles([x["tpot"] for x in m if x["tpot"] is not None]),
           "itl_s": percentiles([g for x in m for g in x["itl"]]),
           "e2e_s": percentiles([x["e2e"] for x in m])}
    # p99 of each SLO metric (no request of more than one token: TPOT 0, as goodput counts it)
    p99 = {"ttft": lat["ttft_s"]["p99"], "tpot": lat["tpot_s"]["p99"] or 0.0, "e2el": lat["e2e_s"]["p99"]}
    slo_met = bool(ok) and not failed and all(p99[k] * 1000 <= limit for k, limit in slos.items())
    compressed = [r["compression"] for r in ok if isinstance(r.get("compression"), dict)
                  and r["compression"].get("cr") and r["compression"].get("slots")]
    slots = sum(c["slots"] for c in compressed)
    return {
        "requests": len(records), "completed": len(ok), "failed": len(failed),
        "errors": sorted({r["error"] for r in failed})[:5],
        "short_outputs": sum(x["tokens"] < r["max_tokens"] for r, x in zip(ok, m)),
        "wall_s": duration, "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
        "total_tokens_per_s": (out_tokens + in_tokens) / duration if duration > 0 else 0.0,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        **lat, "goodput_rps": goodput(m, slos, duration), "slos": slos, "slo_met": slo_met,
        "realized_cr_responses": (sum(c["cr"] * c["slots"] for c in compressed) / slots
                                  if compressed and len(compressed) == len(ok) else None),
    }


# ---------------------------------------------------------------------- rows, JSON and the Markdown table
def _key_value(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list):
        return tuple(_key_value(x) for x in v)
    return v


def row_key(row: dict) -> tuple:
    return tuple(_key_value(row.get(k)) for k in ROW_KEY)


def _rate_value(rate) -> float:
    return math.inf if rate == "inf" else float(rate)


def _sort_key(row: dict) -> tuple:
    rate = row.get("request_rate")
    load = (0, row["clients"] or 0) if rate is None else (1, _rate_value(rate))
    method = METHODS.index(row["method"]) if row.get("method") in METHODS else len(METHODS)
    return (str(row.get("gpu")), str(row.get("model")), row.get("kv_cache_gib") or 0, str(row.get("prompts")),
            str(row.get("prompt_lens")), str(row.get("gen_lens")), row.get("max_concurrency") or 0,
            row.get("burstiness") or 1, load, method, row.get("target_cr") or 0)


def load_rows(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: not a serve_load results file (a list of rows under 'rows')")
    return rows


def upsert_rows(rows: list[dict], new: list[dict]) -> list[dict]:
    """``rows`` with each of ``new`` added, replacing a row of the same ``ROW_KEY``; sorted for the table."""
    keys = {row_key(r) for r in new}
    kept = [r for r in rows if row_key(r) not in keys]
    merged = {}
    for r in new:  # the last of equal keys wins
        merged[row_key(r)] = r
    return sorted(kept + list(merged.values()), key=_sort_key)


def write_rows(path: str | pathlib.Path, rows: list[dict]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    about = ("written by benchmarks/serve_load.py (--results): one row per run; a run with the same "
             f"({', '.join(ROW_KEY)}) replaces its row; see the script's docstring for the fields")
    body = ",\n".join("  " + json.dumps(r) for r in rows)  # a row a line: diffs show the runs that changed
    path.write_text(f'{{"about": {json.dumps(about)},\n "rows": [\n{body}\n ]}}\n' if rows else
                    json.dumps({"about": about, "rows": []}) + "\n")


def _num(v, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def _load(row: dict) -> str:
    if row.get("request_rate") is None:
        return f"{row['clients']} clients"
    rate = row["request_rate"]
    text = "inf" if rate == "inf" else f"{float(rate):g}/s"
    if row.get("burstiness") not in (None, 1, 1.0):
        text += f" (burstiness {row['burstiness']:g})"
    if row.get("max_concurrency"):
        text += f", ≤{row['max_concurrency']} in flight"
    return text


def _lens(row: dict) -> str:
    return f"{','.join(map(str, row['prompt_lens']))} / {','.join(map(str, row['gen_lens']))}"


def serving_table(rows: list[dict], results_name: str = "docs/results/serving.json") -> str:
    """The block under ``## Serving``: every row of the results file, then the highest rate of each sweep
    that met the SLOs."""
    rows = sorted(rows, key=_sort_key)
    lines = [
        f"Written by `benchmarks/serve_load.py` from `{results_name}` (`--results`, `--report`; re-render with "
        "`--render-only`): one row per run, keyed by (GPU, model, method, target CR, KV GiB, prompts, "
        "prompt / generated tokens, load); re-running a run replaces its row, and `commit` is the code that "
        "measured it. *Peak running*: the most requests the server held at once (polled from /metrics). "
        "Load: *N clients* = N concurrent streaming clients, each sending its next request when one finishes; "
        "*R/s* = Poisson arrivals at R requests/s (*inf*: all at once). TTFT: send to first token; ITL: every "
        "gap between two tokens; TPOT per request = (e2e − TTFT) / (output tokens − 1); goodput: completed "
        "requests/s meeting every SLO; *SLO met*: nothing failed and the p99s within the limits. Every request "
        "generates its length (ignore_eos, greedy).",
        "",
        "| GPU | model | method | target CR | realized CR | KV GiB | prompts | prompt / gen tokens | load "
        "| requests (failed) | peak running | output tok/s | total tok/s | TTFT p50 / p99 ms | ITL p50 ms "
        "| TPOT p50 / p99 ms | goodput req/s | SLO (ms) | SLO met | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gpu']} | {r['model']} | {r['method']} | {_num(r.get('target_cr'), 'g')} "
            f"| {_num(r.get('realized_cr'), '.2f')} | {_num(r.get('kv_cache_gib'), 'g')} | {r['prompts']} "
            f"| {_lens(r)} | {_load(r)} | {r['requests']} ({r['failed']}) | {_num(r.get('peak_running'))} "
            f"| {_num(r['output_tokens_per_s'])} "
            f"| {_num(r['total_tokens_per_s'])} | {_num(r['ttft_p50_ms'])} / {_num(r['ttft_p99_ms'])} "
            f"| {_num(r['itl_p50_ms'], '.1f')} | {_num(r['tpot_p50_ms'], '.1f')} / {_num(r.get('tpot_p99_ms'), '.1f')} "
            f"| {_num(r['goodput_rps'], '.2f')} | {r.get('slo') or '-'} | {'yes' if r.get('slo_met') else 'no'} "
            f"| {r['commit']} |")
    if not rows:
        lines.append("| (no runs recorded) |" + " |" * 19)
    sweeps: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("request_rate") is not None and r["request_rate"] != "inf":
            key = tuple(_key_value(r.get(k)) for k in ROW_KEY if k != "request_rate") + (r.get("slo"),)
            sweeps.setdefault(key, []).append(r)
    if sweeps:
        lines += [
            "", "Highest Poisson rate of each sweep that met the SLOs (p99 of each within its limit, nothing failed):",
            "", "| GPU | model | method | target CR | KV GiB | prompts | prompt / gen tokens | SLO (ms) "
            "| rates run (req/s) | highest rate met (req/s) | its output tok/s | commit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for group in sweeps.values():
            r = group[0]
            met = [g for g in group if g.get("slo_met")]
            best = max(met, key=lambda g: float(g["request_rate"])) if met else None
            rates = ", ".join(format(float(g["request_rate"]), "g") for g in group)
            highest = "none" if best is None else format(float(best["request_rate"]), "g")
            commits = ", ".join(sorted({g["commit"] for g in group}))
            lines.append(
                f"| {r['gpu']} | {r['model']} | {r['method']} | {_num(r.get('target_cr'), 'g')} "
                f"| {_num(r.get('kv_cache_gib'), 'g')} | {r['prompts']} | {_lens(r)} | {r.get('slo') or '-'} "
                f"| {rates} | {highest} | {'-' if best is None else _num(best['output_tokens_per_s'])} | {commits} |")
    return "\n".join(lines)


def shown_path(path: str | pathlib.Path) -> str:
    """``path`` relative to the repository when inside it (as the table names its source)."""
    path = pathlib.Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def write_serving_section(path: str | pathlib.Path, table: str) -> None:
    """Replace the block between the table markers in ``path`` (kept anywhere in the file); without markers,
    put it right under a ``## Serving`` heading line, or append that heading and the block. Nothing else of
    the file changes."""
    path = pathlib.Path(path)
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MD_BEGIN}\n{table.rstrip()}\n{MD_END}"
    if MD_BEGIN in current and MD_END in current:
        head, rest = current.split(MD_BEGIN, 1)
        current = head + block + rest.split(MD_END, 1)[1]
    else:
        lines = current.split("\n")
        at = next((i for i, line in enumerate(lines) if line.rstrip() == MD_HEADING), None)
        if at is None:
            current = current.rstrip("\n") + f"\n\n{MD_HEADING}\n\n{block}\n"
        else:
            after = lines[at + 1:]
            while after and not after[0].strip():
                after.pop(0)
            current = "\n".join(lines[:at + 1] + ["", block] + ([""] + after if after else [""]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)


# ---------------------------------------------------------------------- the server and its metrics
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


def git_commit() -> str | None:
    """``git rev-parse --short HEAD`` of this checkout, +dirty when dmc/ or benchmarks/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=30)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dmc", "benchmarks"],
                               cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def server_flag(server_args: str, flag: str, takes_value: bool = True):
    """The value of ``flag`` in a ``dmc serve`` argument string (True for a switch), None when absent."""
    words = shlex.split(server_args or "")
    for i, w in enumerate(words):
        if w == flag:
            return (words[i + 1] if i + 1 < len(words) else None) if takes_value else True
        if takes_value and w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def derive_method(model_dir: str | None, server_args: str) -> tuple[str | None, float | None]:
    """(method, target CR) of a started server from its args, then its model's config.json (None: unknown)."""
    if server_flag(server_args, "--eviction"):
        return server_flag(server_args, "--eviction"), None
    if server_flag(server_args, "--vanilla", takes_value=False):
        return "vanilla", 1.0
    forced = server_flag(server_args, "--forced-cr")
    if forced and float(forced) > 0:
        return "dmc", float(forced)
    config_path = pathlib.Path(model_dir or "") / "config.json"
    if not model_dir or not config_path.is_file():
        return None, None
    config = json.loads(config_path.read_text())
    if isinstance(config.get("dmc"), dict) or str(config.get("model_type", "")).startswith("dmc"):
        target = (config.get("dmc") or {}).get("target_cr")
        return "dmc", None if target is None else float(target)
    return "vanilla", 1.0


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
                self.proc.wait()
        self.log.close()


def metric(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


# ---------------------------------------------------------------------- the load
async def one_request(client: httpx.AsyncClient, body: dict, t0: float) -> dict:
    """One streaming completion; times are seconds since ``t0`` (perf_counter). A record with ``error`` when it
    did not complete (HTTP error, an error event, no tokens, a stream cut before its finish_reason)."""
    record = {"start": time.perf_counter() - t0, "stamps": [], "max_tokens": body["max_tokens"],
              "prompt_tokens": len(body["prompt"]), "finish_reason": None, "compression": None,
              "usage_completion_tokens": None}
    stamps = record["stamps"]
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {**record, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {**record, "error": str(chunk["error"].get("message", chunk["error"]))}
                if chunk.get("usage"):
                    record["usage_completion_tokens"] = chunk["usage"].get("completion_tokens")
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                n = len(choice.get("token_ids") or []) or (1 if choice.get("text") else 0)
                if n:
                    stamps.append([time.perf_counter() - t0, n])
                if choice.get("finish_reason"):
                    record["finish_reason"] = choice["finish_reason"]
                    record["compression"] = choice.get("dmc_compression")
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the request is counted failed with it
        return {**record, "error": f"{type(exc).__name__}: {exc}"[:300]}
    if not stamps:
        return {**record, "error": "no tokens"}
    if record["finish_reason"] is None:
        return {**record, "error": "the stream ended without a finish_reason"}
    return record


def build_bodies(args, model: str) -> list[dict]:
    rng = random.Random(args.seed)
    prompts, gens = [], []
    for _ in range(args.requests):  # random ids: drawn in this order, so a --seed gives the mix of earlier runs
        n = rng.choice(args.prompt_lens)
        prompts.append([n] if args.prompt_text else [rng.randrange(args.min_token_id, args.vocab_size)
                                                      for _ in range(n)])
        gens.append(rng.choice(args.gen_lens))
    if args.prompt_text:
        prompts = text_prompts(args, rng, [p[0] for p in prompts])
    return [{"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}} for prompt, gen in zip(prompts, gens)]


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


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class _Nothing:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Nothing()
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


async def run_load(client: httpx.AsyncClient, bodies: list[dict], *, clients: int | None = None,
                   request_rate: float | None = None, max_concurrency: int | None = None, burstiness: float = 1.0,
                   seed: int = 0, progress: bool = False, desc: str = "") -> tuple[list[dict], float]:
    """Send ``bodies`` with ``clients`` concurrent clients (each takes the next request when its last one ends)
    or at ``request_rate`` (arrival_times; at most ``max_concurrency`` in flight); returns one record per body,
    in order, and the duration (first send to last answer)."""
    records: list[dict | None] = [None] * len(bodies)
    bar = _progress(len(bodies), desc, progress)
    t0 = time.perf_counter()

    async def send(i: int) -> None:
        records[i] = await one_request(client, bodies[i], t0)
        bar.update(1)

    if clients:
        next_index = iter(range(len(bodies)))

        async def worker() -> None:
            for i in next_index:
                await send(i)

        await asyncio.gather(*(worker() for _ in range(min(clients, len(bodies)))))
    else:
        arrivals = arrival_times(len(bodies), request_rate, seed, burstiness)
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def arrive(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            if limit is None:
                await send(i)
            else:
                async with limit:
                    await send(i)

        await asyncio.gather(*(arrive(i) for i in range(len(bodies))))
        for record, at in zip(records, arrivals):
            record["arrival"] = at
    duration = time.perf_counter() - t0
    bar.close()
    assert all(r is not None for r in records)  # every request answered or failed: none lost
    return records, duration


async def scrape_metrics(client: httpx.AsyncClient) -> str | None:
    """The server's /metrics text, or None when it does not answer."""
    try:
        r = await client.get("/metrics", timeout=10)
        return r.text if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def run_all(args, url: str, model: str, runs: list[dict]) -> list[dict]:
    """Every run of ``runs`` (``clients`` or ``request_rate``) against one server, warmed up once."""
    bodies = build_bodies(args, model)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:
        for body in bodies[:args.warmup]:  # first calls compile / warm caches; not measured
            await one_request(client, {**body, "max_tokens": min(body["max_tokens"], 8)}, time.perf_counter())

        for run in runs:
            before = await scrape_metrics(client)
            running_seen, pages_used = [], []
            done = asyncio.Event()

            async def poll() -> None:
                while not done.is_set():
                    text = await scrape_metrics(client)
                    running_seen.append(metric(text, "dmc_requests_running"))
                    pages_used.append(metric(text, "dmc_kv_pages_used"))
                    try:
                        await asyncio.wait_for(done.wait(), args.poll)
                    except asyncio.TimeoutError:
                        pass

            poller = asyncio.create_task(poll())
            desc = f"{run['clients']} clients" if run["clients"] else f"rate {run['request_rate']:g}/s"
            print(f"run {len(results) + 1} of {len(runs)}: {desc}, {len(bodies)} requests", flush=True)
            records, duration = await run_load(
                client, bodies, clients=run["clients"], request_rate=run["request_rate"],
                max_concurrency=args.max_concurrency, burstiness=args.burstiness, seed=args.seed,
                progress=not args.no_progress, desc=desc)
            done.set()
            await poller
            after = await scrape_metrics(client)
            # Nothing lost: once idle, every page is back on the free list (the engine reports it when idle).
            left = metric(after, "dmc_kv_pages_used")
            for _ in range(20):
                if left is None or left == 0:
                    break
                await asyncio.sleep(0.1)
                after = await scrape_metrics(client)
                left = metric(after, "dmc_kv_pages_used")
            if left:
                print(f"warning: {left:g} KV pages still in use after the run", flush=True)
            summary = summarize(records, duration, args.slos)
            a, b = metric(before, "dmc_preemptions_total"), metric(after, "dmc_preemptions_total")
            cr = summary.pop("realized_cr_responses")
            result = {
                **summary, "clients": run["clients"],
                "request_rate": None if run["request_rate"] is None else
                ("inf" if math.isinf(run["request_rate"]) else run["request_rate"]),
                "max_concurrency": args.max_concurrency if run["request_rate"] is not None else None,
                "burstiness": args.burstiness if run["request_rate"] is not None else None,
                "prompt_lens": args.prompt_lens, "gen_lens": args.gen_lens,
                "prompts": "windows of " + " ".join(args.prompt_text) if args.prompt_text else "random token ids",
                "peak_running_polled": max((x for x in running_seen if x is not None), default=None),
                "peak_running_server": metric(after, "dmc_requests_running_peak"),
                "peak_kv_pages_used": max((x for x in pages_used if x is not None), default=None),
                "kv_pages_total": metric(after, "dmc_kv_pages_total"),
                "realized_cr": cr if cr is not None else metric(after, "dmc_realized_compression_ratio"),
                "preemptions": None if a is None or b is None else b - a,
                "pages_returned": None if left is None else left == 0,
            }
            if args.save_detailed:
                result["detail"] = records
            results.append(result)
            print(one_line(result), flush=True)
    return results


# ---------------------------------------------------------------------- reports
def _ms(v) -> float | None:
    return None if v is None else round(v * 1000, 3)


def make_row(result: dict, meta: dict) -> dict:
    row = {
        "gpu": meta["device"], "model": meta["model_name"], "method": meta["method"], "target_cr": meta["target_cr"],
        "realized_cr": None if result["realized_cr"] is None else round(result["realized_cr"], 3),
        "kv_cache_gib": meta["kv_cache_gib"], "prompts": "text" if meta["prompt_text"] else "random",
        "prompt_lens": result["prompt_lens"], "gen_lens": result["gen_lens"], "clients": result["clients"],
        "request_rate": result["request_rate"], "max_concurrency": result["max_concurrency"],
        "burstiness": result["burstiness"], "requests": result["requests"], "completed": result["completed"],
        "failed": result["failed"], "short_outputs": result["short_outputs"], "duration_s": round(result["wall_s"], 3),
        "output_tokens_per_s": round(result["output_tokens_per_s"], 2),
        "total_tokens_per_s": round(result["total_tokens_per_s"], 2),
        "requests_per_s": round(result["requests_per_s"], 4),
        **{f"{name}_{p}_ms": _ms(result[f"{name}_s"][p]) for name in ("ttft", "tpot", "itl")
           for p in ("p50", "p90", "p99")},
        "e2el_p50_ms": _ms(result["e2e_s"]["p50"]), "e2el_p99_ms": _ms(result["e2e_s"]["p99"]),
        "goodput_rps": round(result["goodput_rps"], 4), "slo": slo_text(result["slos"]), "slo_met": result["slo_met"],
        "peak_running": result["peak_running_polled"], "preemptions": result["preemptions"],
        "pages_returned": result.get("pages_returned"), "seed": meta["seed"],
        "server_args": meta["server_args"], "date": meta["date"], "commit": meta["commit"],
    }
    return {k: row[k] for k in ROW_FIELDS}


def run_name(result: dict) -> str:
    if result["clients"]:
        return f"{result['clients']} clients"
    rate = result["request_rate"]
    return "rate inf" if rate == "inf" else f"rate {rate:g}/s"


def one_line(result: dict) -> str:
    load = run_name(result)
    f = lambda d, p: "-" if d[p] is None else f"{d[p] * 1000:.1f}"  # noqa: E731
    return (f"[{load}] {result['completed']}/{result['requests']} completed, {result['failed']} failed; "
            f"{result['output_tokens_per_s']:.1f} output tok/s; TTFT p50/p99 {f(result['ttft_s'], 'p50')}/"
            f"{f(result['ttft_s'], 'p99')} ms; TPOT p50/p99 {f(result['tpot_s'], 'p50')}/{f(result['tpot_s'], 'p99')} "
            f"ms; ITL p50 {f(result['itl_s'], 'p50')} ms; goodput {result['goodput_rps']:.2f} req/s "
            f"({slo_text(result['slos'])}): SLOs {'met' if result['slo_met'] else 'missed'} at p99")


def markdown(result: dict, meta: dict) -> str:
    ms = lambda d: " / ".join("-" if v is None else f"{v * 1000:.1f}" for v in d.values())  # noqa: E731
    cr = result["realized_cr"]
    cap = f" (at most {result['max_concurrency']} in flight)" if result["max_concurrency"] else ""
    load = (f"{result['clients']} concurrent streaming clients" if result["clients"] else
            f"every request sent at once{cap}" if result["request_rate"] == "inf" else
            f"arrivals at {result['request_rate']:g} requests/s (gamma inter-arrival times of shape "
            f"{result['burstiness']:g}: 1 is Poisson){cap}")
    return "\n".join([
        f"### Serving load: {meta['label']}",
        "",
        f"`benchmarks/serve_load.py` on **{meta['device']}**, {meta['date']}, commit {meta['commit']}; model "
        f"`{meta['model']}`, server args `{meta['server_args'] or '-'}`; {load}, "
        f"{result['requests']} requests, prompt lengths {result['prompt_lens']}, generation lengths "
        f"{result['gen_lens']} (uniform mix, greedy, ignore_eos); prompts: {result['prompts']}.",
        "",
        "| output tok/s | total tok/s | req/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms "
        "| e2e p50/p90/p99 ms | goodput req/s | peak running | peak KV pages | realized CR | preemptions | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {result['output_tokens_per_s']:.0f} | {result['total_tokens_per_s']:.0f} | {result['requests_per_s']:.2f} "
        f"| {ms(result['ttft_s'])} | {ms(result['tpot_s'])} | {ms(result['itl_s'])} | {ms(result['e2e_s'])} "
        f"| {result['goodput_rps']:.2f} ({slo_text(result['slos'])}) "
        f"| {_num(result['peak_running_polled'])} (server: {_num(result['peak_running_server'])}) "
        f"| {_num(result['peak_kv_pages_used'])} of {_num(result['kv_pages_total'])} "
        f"| {'-' if cr is None else f'{cr:.2f}'} | {_num(result['preemptions'] or 0)} | {result['failed']} |",
    ])


def summary_text(results: list[dict]) -> str:
    rated = [r for r in results if r["request_rate"] not in (None, "inf")]
    if len(rated) < 1:
        return ""
    met = [r for r in rated if r["slo_met"]]
    slos = slo_text(results[0]["slos"])
    if not met:
        return f"no request rate of the sweep met the SLOs ({slos}) at p99"
    best = max(met, key=lambda r: r["request_rate"])
    return (f"highest request rate of the sweep meeting the SLOs ({slos}) at p99: {best['request_rate']:g} req/s "
            f"({best['output_tokens_per_s']:.1f} output tok/s, goodput {best['goodput_rps']:.2f} req/s)")


# ---------------------------------------------------------------------- the command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="serve_load.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running server (e.g. http://127.0.0.1:8000)")
    target.add_argument("--model", help="start `dmc serve MODEL` here (a free port), load it, stop it")
    target.add_argument("--render-only", action="store_true",
                        help="run nothing: merge --merge files into --results and rewrite --report from it")
    parser.add_argument("--server-args", default="",
                        help="more `dmc serve` flags, one string (with --model; a flag alone: --server-args=--vanilla)")
    parser.add_argument("--server-log", default="serve_load_server.log", help="the started server's output")
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for the server")
    parser.add_argument("--api-key", default=os.environ.get("DMC_API_KEY"), help="the server's key, if any")
    load = parser.add_argument_group("load (one of --clients / --request-rate; default: --clients 64)")
    load.add_argument("--clients", type=int, nargs="+", default=None, metavar="N",
                      help="concurrent streaming clients (several: one run each)")
    load.add_argument("--request-rate", nargs="+", default=None, metavar="R",
                      help="Poisson arrivals at R requests/s, or inf (all at once); several: a sweep, one run each")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="with --request-rate: at most this many requests in flight (default: no cap)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="with --request-rate: the gamma shape of the inter-arrival times (1: Poisson)")
    load.add_argument("--requests", type=int, default=256, help="requests of each run")
    load.add_argument("--goodput", nargs="+", default=DEFAULT_SLOS, metavar="METRIC:MS",
                      help="SLOs in ms for goodput and the p99 verdict; METRIC: ttft, tpot, e2el")
    parser.add_argument("--prompt-lens", default="128,512,2048", help="prompt lengths in tokens, drawn uniformly")
    parser.add_argument("--gen-lens", default="64,256", help="generation lengths in tokens, drawn uniformly")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="prompt ids are drawn below it (default: the model's config.json with --model, else 1000)")
    parser.add_argument("--min-token-id", type=int, default=3, help="lowest prompt id (skip special tokens)")
    parser.add_argument("--prompt-text", nargs="+", default=None, metavar="PATH",
                        help="prompts are windows of these text files / folders (tokenized by --tokenizer) instead of "
                             "random ids: a DMC model compresses text like its training data far more than random ids")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --prompt-text (default: --model)")
    parser.add_argument("--warmup", type=int, default=2, help="short unmeasured requests first (once per server)")
    parser.add_argument("--timeout", type=float, default=3600, help="per-request timeout in seconds")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between /metrics polls")
    parser.add_argument("--seed", type=int, default=0, help="draws the request mix and the arrival times")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    rec = parser.add_argument_group("what the rows say (--results)")
    rec.add_argument("--method", choices=METHODS, default=None,
                     help="what the server runs (default: derived from --server-args and the model, with --model)")
    rec.add_argument("--target-cr", type=float, default=None,
                     help="the CR the model / server aims at (default: derived as --method; vanilla: 1)")
    rec.add_argument("--kv-cache-gib", type=float, default=None,
                     help="the server's KV pool in GiB (default: its --kv-cache-memory-gib)")
    rec.add_argument("--model-name", default=None, help="the model's name in rows (default: the model dir's name)")
    rec.add_argument("--commit", default=None, help="the code's commit (default: git rev-parse --short HEAD)")
    rec.add_argument("--device-name", default=None, help="the server's device (default: detected here)")
    parser.add_argument("--label", default=None, help="names the run (and its section in a .md --out)")
    parser.add_argument("--out", default=None, help="a .md file (a section per --label) or a JSON file")
    parser.add_argument("--save-detailed", action="store_true", help="--out JSON holds every request's timestamps")
    parser.add_argument("--results", default=None, metavar="PATH.json",
                        help="record one row per run in this JSON file (e.g. docs/results/serving.json)")
    parser.add_argument("--report", default=None, metavar="PATH.md",
                        help="rewrite the `## Serving` table of this Markdown file from --results")
    parser.add_argument("--merge", nargs="+", default=[], metavar="PATH.json",
                        help="with --render-only: rows of these results files replace / join those of --results")
    args = parser.parse_args(argv)

    def fail(message: str):
        parser.error(message)

    if args.results and not args.results.endswith(".json"):
        fail(f"--results takes a .json file, got {args.results}")
    if args.report and not args.report.endswith(".md"):
        fail(f"--report takes a .md file, got {args.report}")
    if args.report and not args.results:
        fail("--report is written from the rows of --results: pass --results PATH.json too")
    if args.render_only:
        if not args.results:
            fail("--render-only needs --results PATH.json (and --report PATH.md to rewrite a table)")
        return args
    if args.merge:
        fail("--merge goes with --render-only")
    if args.save_detailed and not (args.out and not args.out.endswith(".md")):
        fail("--save-detailed goes with --out PATH.json (the per-request timestamps go there)")
    if not (args.url or args.model):
        fail("say which server to load: --url URL (a running one) or --model DIR (started here)")
    if args.server_args and not args.model:
        fail("--server-args needs --model (with --url the server runs already)")
    if args.clients is not None and args.request_rate is not None:
        fail("--clients and --request-rate are two kinds of load: pass one (a rate with a cap: --max-concurrency)")
    if args.clients is None and args.request_rate is None:
        args.clients = [64]
    if args.clients is not None and min(args.clients) < 1:
        fail(f"--clients takes counts >= 1, got {' '.join(map(str, args.clients))}")
    if args.request_rate is not None:
        try:
            args.request_rate = [parse_rate(r) for r in args.request_rate]
        except ValueError as exc:
            fail(f"--request-rate: {exc}")
    if args.max_concurrency is not None and (args.request_rate is None or args.max_concurrency < 1):
        fail("--max-concurrency takes a count >= 1 and goes with --request-rate (--clients fixes the concurrency)")
    if not args.burstiness > 0 or math.isinf(args.burstiness):
        fail(f"--burstiness must be a finite number > 0, got {args.burstiness}")
    if args.requests < 1:
        fail(f"--requests must be >= 1, got {args.requests}")
    if args.warmup < 0 or args.timeout <= 0 or args.poll <= 0:
        fail("--warmup must be >= 0, --timeout and --poll > 0")
    try:
        args.slos = parse_slos(args.goodput)
        args.prompt_lens = parse_lens(args.prompt_lens, "--prompt-lens")
        args.gen_lens = parse_lens(args.gen_lens, "--gen-lens")
    except ValueError as exc:
        fail(str(exc))
    if args.prompt_text and not (args.tokenizer or args.model):
        fail("--prompt-text needs --tokenizer DIR with --url (with --model the model's tokenizer is used)")
    if args.model and not (pathlib.Path(args.model) / "config.json").is_file():
        fail(f"--model {args.model} is not a Hugging Face model directory (no config.json)")
    if args.vocab_size is None:
        args.vocab_size = 1000
        if args.model:
            args.vocab_size = json.loads((pathlib.Path(args.model) / "config.json").read_text())["vocab_size"]
    if not args.prompt_text and args.vocab_size <= args.min_token_id:
        fail(f"--vocab-size ({args.vocab_size}) must exceed --min-token-id ({args.min_token_id})")
    if args.target_cr is not None and not args.target_cr >= 1:
        fail(f"--target-cr must be >= 1 (1 = no compression), got {args.target_cr}")
    if args.kv_cache_gib is not None and not args.kv_cache_gib > 0:
        fail(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
    if args.label and args.out and args.out.endswith(".md") and not args.label.strip():
        fail("--label is empty")
    # What the rows say: explicit flags, else derived from the started server; contradictions refused.
    derived_method, derived_cr = derive_method(args.model, args.server_args) if args.model else (None, None)
    if args.method and derived_method and args.method != derived_method:
        fail(f"--method {args.method}, but the server runs {derived_method} (from --server-args / the model's "
             "config.json)")
    if args.target_cr is not None and derived_cr is not None and args.target_cr != derived_cr:
        fail(f"--target-cr {args.target_cr:g}, but the server's target CR is {derived_cr:g} (from --server-args / "
             "the model's config.json)")
    args.method = args.method or derived_method
    if args.target_cr is None:
        args.target_cr = 1.0 if args.method == "vanilla" else derived_cr
    elif args.method == "vanilla" and args.target_cr != 1:
        fail(f"--target-cr {args.target_cr:g} with --method vanilla: a vanilla run's target CR is 1")
    kv = server_flag(args.server_args, "--kv-cache-memory-gib")
    if kv is not None and args.kv_cache_gib is not None and float(kv) != args.kv_cache_gib:
        fail(f"--kv-cache-gib {args.kv_cache_gib:g}, but --server-args has --kv-cache-memory-gib {kv}")
    if args.kv_cache_gib is None and kv is not None:
        args.kv_cache_gib = float(kv)
    if args.results:
        if args.method is None:
            fail("--results: say what the server runs with --method vanilla|dmc (not derivable here)")
        if args.target_cr is None and args.method == "dmc":
            fail("--results: say the DMC model's target CR with --target-cr (its config.json has none)")
        if args.url and not args.device_name:
            fail("--results with --url: name the server's GPU with --device-name (it is not detected from here)")
    return args


def render(args) -> None:
    rows = load_rows(args.results)
    for path in args.merge:
        rows = upsert_rows(rows, load_rows(path))
    write_rows(args.results, rows)
    if args.report:
        write_serving_section(args.report, serving_table(rows, shown_path(args.results)))
    print(f"{len(rows)} rows in {args.results}" + (f"; table written to {args.report}" if args.report else ""))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.render_only:
        try:
            render(args)
        except (ValueError, json.JSONDecodeError) as exc:
            raise SystemExit(f"serve_load.py: error: {exc}") from None
        return []
    runs = ([{"clients": c, "request_rate": None} for c in args.clients] if args.clients else
            [{"clients": None, "request_rate": r} for r in args.request_rate])
    commit = args.commit or git_commit()
    if commit is None:
        commit = "unknown"
        print("serve_load.py: warning: no git checkout here and no --commit: rows say commit 'unknown'",
              file=sys.stderr)
    server = Server(args.model, args.server_args, args.server_log) if args.model else None
    try:
        url = server.url if server else args.url.rstrip("/")
        if server:
            server.wait_ready(args.startup_timeout)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
            models.raise_for_status()
            model = models.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise SystemExit(f"serve_load.py: error: no model listed by {url}/v1/models ({exc})") from None
        results = asyncio.run(run_all(args, url, model, runs))
    finally:
        if server:
            server.stop()
    meta = {"label": args.label or model, "model": args.model or model,
            "model_name": args.model_name or (pathlib.Path(args.model).name if args.model else model),
            "url": None if server else url, "server_args": args.server_args if server else None,
            "device": args.device_name or device_name(server is not None), "method": args.method,
            "target_cr": args.target_cr, "kv_cache_gib": args.kv_cache_gib, "prompt_text": args.prompt_text,
            "seed": args.seed, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["serve_load.py", *argv]))}
    labels = [meta["label"] + ("" if len(results) == 1 else f", {run_name(r)}") for r in results]
    for result, label in zip(results, labels):
        print(markdown(result, {**meta, "label": label}))
    summary = summary_text(results)
    if summary:
        print(summary)
    if args.out:
        if args.out.endswith(".md"):
            from _report import write_section
            for result, label in zip(results, labels):
                slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
                write_section(args.out, f"serve_load-{slug}",
                              markdown(result, {**meta, "label": label}) + f"\n\nCommand: `{meta['command']}`")
        else:
            data = {"meta": meta, **results[0]} if len(results) == 1 else {"meta": meta, "runs": results}
            pathlib.Path(args.out).write_text(json.dumps(data, indent=1))
        print(f"written to {args.out}")
    if args.results:
        rows = upsert_rows(load_rows(args.results), [make_row(r, meta) for r in results])
        write_rows(args.results, rows)
        print(f"{len(results)} rows recorded in {args.results}")
        if args.report:
            write_serving_section(args.report, serving_table(rows, shown_path(args.results)))
            print(f"the Serving table of {args.report} rewritten ({len(rows)} rows)")
    if any(r["failed"] for r in results):
        for r in results:
            for e in r["errors"]:
                print(f"failed: {e}", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
