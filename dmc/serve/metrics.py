"""Prometheus metrics of the server (``GET /metrics``), one registry per app.

The engine loop updates them after every step; a scrape never touches the engine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model = model_name
        label = ["model"]
        self.running = Gauge("dmc_requests_running", "requests holding KV pages (prefilled, decoding)", label,
                             registry=r)
        self.waiting = Gauge("dmc_requests_waiting", "requests queued, not yet given a first token", label,
                             registry=r)
        self.running_peak = Gauge("dmc_requests_running_peak", "most requests running at once since start", label,
                                  registry=r)
        self.requests = Counter("dmc_requests", "finished engine requests (one per choice)",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("dmc_prompt_tokens", "prompt tokens submitted", label, registry=r)
        self.generation_tokens = Counter("dmc_generation_tokens", "tokens generated", label, registry=r)
        self.preemptions = Counter("dmc_preemptions", "times a request lost its cache and was recomputed", label,
                                   registry=r)
        self.pages_free = Gauge("dmc_kv_pages_free", "free KV-cache pages", label, registry=r)
        self.pages_used = Gauge("dmc_kv_pages_used", "KV-cache pages held by requests", label, registry=r)
        self.pages_total = Gauge("dmc_kv_pages_total", "KV-cache pages in the pool (free when idle)", label,
                                 registry=r)
        self.cr = Gauge("dmc_realized_compression_ratio",
                        "realized CR of finished requests: sum of tokens / sum of slots kept", label, registry=r)
        self.ttft = Histogram("dmc_time_to_first_token_seconds", "arrival to first generated token", label,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dmc_inter_token_latency_seconds", "time between two tokens of one request", label,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dmc_request_latency_seconds", "arrival to last token", label,
                             buckets=LATENCY_BUCKETS, registry=r)
        for metric in (self.running, self.waiting, self.running_peak, self.prompt_tokens, self.generation_tokens,
                       self.preemptions, self.ttft, self.itl, self.e2e):
            metric.labels(model_name)  # exported (as 0) before the first request
        self.prefix_queries = Counter("dmc_prefix_cache_queries", "prompt tokens of requests admitted with prefix "
                                      "caching on", label, registry=r)
        self.prefix_hits = Counter("dmc_prefix_cache_hits", "of them, tokens that came from a prefix-cache snapshot "
                                   "(not prefilled)", label, registry=r)
        self.prefix_hit_rate = Gauge("dmc_prefix_cache_hit_rate", "prefix cache hits / queries (tokens) since start",
                                     label, registry=r)
        self.prefix_snapshots = Gauge("dmc_prefix_cache_snapshots", "prefix-cache snapshots kept (parked cache rows)",
                                      label, registry=r)
        self.prefix_pages = Gauge("dmc_prefix_cache_pages", "KV-cache pages the prefix-cache snapshots hold (counted "
                                  "in dmc_kv_pages_used; given back whenever a request needs them)", label, registry=r)
        self._tokens = self._slots = 0
        self._peak = 0
        self._prefix_counted = (0, 0)  # the engine's queried and reused tokens already added to the counters

    def observe_compression(self, tokens: float, slots: int) -> None:
        """A finished request's tokens (summed over its layers and KV heads) and slots kept."""
        self._tokens += tokens
        self._slots += slots
        if self._slots:
            self.cr.labels(self.model).set(self._tokens / self._slots)

    def set_queues(self, running: int, waiting: int) -> None:
        self.running.labels(self.model).set(running)
        self.waiting.labels(self.model).set(waiting)
        if running > self._peak:
            self._peak = running
            self.running_peak.labels(self.model).set(running)

    def set_pages(self, free: int | None, total: int | None) -> None:
        if free is None or total is None:
            return
        self.pages_free.labels(self.model).set(free)
        self.pages_used.labels(self.model).set(total - free)
        self.pages_total.labels(self.model).set(total)

    def set_prefix_cache(self, stats: dict) -> None:
        """The engine's prefix cache counts (``LLM.prefix_cache_stats()``: running totals; the counters get what
        was added since the last call)."""
        queried, reused = stats["queried_tokens"], stats["reused_tokens"]
        last_queried, last_reused = self._prefix_counted
        if queried < last_queried or reused < last_reused:  # the engine's counts were reset
            last_queried = last_reused = 0
        self.prefix_queries.labels(self.model).inc(queried - last_queried)
        self.prefix_hits.labels(self.model).inc(reused - last_reused)
        self._prefix_counted = (queried, reused)
        self.prefix_hit_rate.labels(self.model).set(stats["hit_rate"])
        self.prefix_snapshots.labels(self.model).set(stats["snapshots"])
        self.prefix_pages.labels(self.model).set(stats["snapshot_pages"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
