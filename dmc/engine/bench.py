"""Throughput measurement of the engine (used by ``dmc bench`` and benchmarks/throughput.py).

Protocol (docs/benchmarks.md): random prompts of ``prompt_len`` tokens, ``gen_len`` greedy new
tokens each, as many sequences as the engine admits at once (requests that do not fit in the
first wave are aborted, so the batch is the largest that fits), output tokens per second over
the last ``measure_steps`` decode steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .params import SamplingParams


@dataclass
class ThroughputResult:
    prompt_len: int
    gen_len: int
    batch: int  # sequences decoded together
    tokens_per_s: float  # output tokens/s over the measured steps
    step_ms: float  # mean decode step time over the measured steps
    measured_steps: int
    prefill_tokens_per_s: float  # prompt tokens/s of the admission (prefill) phase, batched prefill steps
    realized_cr: float  # tokens per slot kept, over all finished requests
    peak_memory_gib: float  # CUDA: the device memory torch allocated at most; CPU: the process's peak RSS
    kv_pool_gib: float
    preemptions: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_throughput(llm, prompt_len: int, gen_len: int, max_requests: int | None = None,
                       measure_steps: int = 1024, seed: int = 0, progress: bool = True,
                       warmup: bool = True) -> ThroughputResult:
    """Run one wave of same-length requests through ``llm`` and time its prefill and decode steps (after
    one warm-up request of the same length, unless ``warmup`` is False). ValueError when the settings
    cannot give a measurement (a prompt that does not fit, no decode step)."""
    if prompt_len < 1 or gen_len < 2 or measure_steps < 1:
        raise ValueError(f"prompt_len must be >= 1, gen_len >= 2 and measure_steps >= 1; got {prompt_len}, "
                         f"{gen_len}, {measure_steps}")
    if prompt_len + gen_len > llm.max_model_len:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} tokens does not fit max_model_len "
                         f"({llm.max_model_len}): lower --prompt-len/--gen-len or raise --max-model-len")
    vocab = llm.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    count = max_requests or llm.scheduler.max_num_seqs
    prompts = torch.randint(3, vocab, (count, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    if llm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(llm.device)
    if warmup:  # compiles the prefill attention of this prompt length (the stock SDPA number is warm too)
        llm.generate([prompts[0]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    requests = [llm.add_request(p, params) for p in prompts]
    _sync(llm)
    start = time.perf_counter()
    # the first wave: every request that fits is prefilled, in the engine's prefill steps (batched:
    # several prompts' chunks share each step's prefill_chunk tokens), no decode step in between
    with tqdm(total=count * prompt_len, desc="prefill", unit="tok", disable=not progress) as bar:
        while llm.scheduler.waiting or any(r.prefilling for r in llm.scheduler.running):
            fed = sum(r.seen for r in requests)
            llm._prefill_step()
            if sum(r.seen for r in requests) == fed:
                break  # the next one does not fit (or failed)
            bar.update(sum(r.seen for r in requests) - fed)
    _sync(llm)
    prefill_s = time.perf_counter() - start
    admitted = len(llm.scheduler.running)
    for request in list(llm.scheduler.waiting):
        llm.abort(request)
    if admitted == 0:
        failed = next((r.error for r in requests if r.error), "no request fit in the KV cache")
        raise ValueError(f"no request could run: {failed}")
    steps: list[tuple[float, int]] = []
    with tqdm(total=gen_len - 1, desc=f"decode B={admitted}", disable=not progress) as bar:
        while llm.has_unfinished():
            batch = len(llm.scheduler.running)
            t0 = time.perf_counter()
            llm.step()  # ends with the sampled tokens on the host: synchronous
            steps.append((time.perf_counter() - t0, batch))
            bar.update(1)
    if not steps:
        raise ValueError("no decode step ran: raise gen_len")
    measured = steps[-min(measure_steps, max(1, len(steps) // 2)):]
    seconds = sum(s for s, _ in measured)
    finished = [r for r in requests if r.finish_reason in ("length", "stop")]
    tokens = sum(r.compression["tokens"] for r in finished) * llm.cache.layout.rows
    slots = sum(r.compression["slots"] for r in finished)
    peak = torch.cuda.max_memory_allocated(llm.device) / 2**30 if llm.device.type == "cuda" else peak_rss_gib()
    pool = (llm.cache.k_pool.numel() + llm.cache.v_pool.numel()) * llm.cache.k_pool.element_size() / 2**30
    return ThroughputResult(
        prompt_len=prompt_len, gen_len=gen_len, batch=admitted,
        tokens_per_s=sum(b for _, b in measured) / seconds, step_ms=1000 * seconds / len(measured),
        measured_steps=len(measured), prefill_tokens_per_s=admitted * prompt_len / prefill_s,
        realized_cr=tokens / max(slots, 1), peak_memory_gib=peak, kv_pool_gib=pool,
        preemptions=sum(r.preemptions for r in requests))


def peak_rss_gib() -> float:
    """The most resident memory this process has held so far, in GiB (the model, the page pool and
    everything else it allocated on the host)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _sync(llm) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
