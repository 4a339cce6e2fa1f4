"""``dmc.LLM``: batch and streaming generation over the paged per-head DMC cache."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..hf.convert import fold_logit_scale
from .cache import CacheLayout, PagedKVCache
from .config import EngineConfig
from .detokenizer import Detokenizer
from .step_timer import StepTimer
from .eviction import EngineEviction
from .kv_scales import DEFAULT_HEADROOM, KVScales
from .params import RequestOutput, SamplingParams
from .policy import NoEviction
from .prefix_cache import make_prefix_cache
from .runner import ModelRunner, load_model
from .scheduler import OUT_OF_MEMORY_DECODING, OUT_OF_MEMORY_PREFILL  # noqa: F401 (their names here too)
from .scheduler import CompressionEstimate, Request, Scheduler

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_SECTIONS = {"prefill": "prefill", "sample": "prefill", "decode": "decode"}  # a pass's step_timer section
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn}  # beside "auto"; its names are config.KV_CACHE_DTYPE_NAMES
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 1024)


class LLM:
    """An inference engine for DMC models (and plain Llama/Mistral/Qwen2/Qwen3 ones, which run as
    the like-for-like vanilla baseline: the same engine with every token appending).

    Args:
        model: an HF model directory (safetensors) with its tokenizer, or an already loaded DMC
            causal LM (then pass ``tokenizer`` if you want text in and out). A loaded model is used
            in place: the engine sets its DMC runtime (``model.set_dmc_mode``: mode, prefill attention).
        config: the engine's settings, an :class:`~dmc.engine.config.EngineConfig` (see there for each one:
            dtype, device, max_model_len, max_num_seqs, memory, prefill, eviction, ...).
        tokenizer: for a loaded model: text in and out (a model directory's own is loaded with it).
        progress: a progress bar in :meth:`generate`.
        **settings: EngineConfig fields, changing ``config`` (or the defaults): ``LLM(path, max_num_seqs=8)``.
            ``eviction`` may be an :class:`~dmc.baselines.EvictionPolicy` (H2O, TOVA, SnapKV).

    A model with delayed merging (``merge_delay`` > 0 in its DMC config) runs exactly (the HF path's
    semantics: the last w tokens of every head raw, counted as slots in ``compression``); its decode step
    has Triton kernels and CUDA graphs on CUDA (:mod:`dmc.kernels.triton_delayed`) like any other model.
    """

    def __init__(self, model, *, config: EngineConfig | None = None, tokenizer=None, progress: bool = True,
                 **settings) -> None:
        self.config = config = (config or EngineConfig()).replace(**settings)
        config.validate()
        self.device = resolve_device(config.device)
        dtype, vanilla, forced_period = config.dtype, config.vanilla, config.forced_period
        eviction, kv_scales = config.eviction_policy(), config.kv_scales
        if isinstance(model, torch.nn.Module) and dtype == "auto":
            dtype = next(model.parameters()).dtype  # a loaded model keeps its dtype
        self.dtype = _resolve_dtype(dtype, self.device)
        self.kv_cache_dtype = (self.dtype if config.kv_cache_dtype == "auto"
                               else KV_CACHE_DTYPES[config.kv_cache_dtype])
        if isinstance(model, torch.nn.Module):
            self.model, plain = model.to(device=self.device, dtype=self.dtype).eval(), False
        else:
            self.model, plain = load_model(str(model), self.dtype, self.device)
            if tokenizer is None:
                tokenizer = _load_tokenizer(str(model))
        if eviction is not None and (forced_period or not (plain or vanilla)):
            raise ValueError("eviction (H2O, TOVA, SnapKV) runs the model uncompressed, every token appending: pass "
                             "a plain model, or vanilla=True for a DMC model (and no forced_period)")
        # The decode kernels read a = k[D-1] - c: a training-time logit scale goes into the weights.
        fold_logit_scale(self.model)
        # forced_period drives the decisions, so even a plain model's weights run the DMC path.
        self.vanilla = (plain or vanilla) and not forced_period
        prefill_attention = config.prefill_attention
        if prefill_attention == "auto":
            prefill_attention = "flex" if self.device.type == "cuda" else "sdpa"
        # The model's one runtime: its mode and the prefill attention (the decode step has its own kernels).
        self.model.set_dmc_mode(vanilla=self.vanilla, attn_implementation=prefill_attention)
        self.tokenizer = tokenizer
        model_config = self.model.config
        self.dmc = self.model.dmc_config
        self.max_model_len = int(config.max_model_len if config.max_model_len is not None
                                 else model_config.max_position_embeddings)
        self.prefill_chunk = prefill_chunk = config.prefill_chunk
        self.max_num_batched_tokens = max_num_batched_tokens = config.max_num_batched_tokens
        max_num_seqs = config.max_num_seqs
        if eviction is not None and eviction.budget >= self.max_model_len:
            raise ValueError(f"the eviction budget ({eviction.budget} slots) must be below max_model_len "
                             f"({self.max_model_len}): else nothing is ever evicted")
        self.eviction = eviction
        self.eos_token_ids = _eos_ids(model_config, tokenizer)
        self._rng = random.Random(config.seed)
        self._progress = progress

        layout = CacheLayout.plan(
            model_config, dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs, window=self.dmc.window, vanilla=self.vanilla,
            utilization=config.gpu_memory_utilization, kv_bytes=config.kv_cache_memory, prefill_chunk=prefill_chunk,
            slot_cap=self._slot_cap,
            row_extra_bytes=(lambda shape: 0) if eviction is None else (
                lambda shape: EngineEviction.sequence_bytes(shape, eviction)), merge_delay=self.dmc.merge_delay,
            kv_dtype=self.kv_cache_dtype)
        self.cache = PagedKVCache(layout, self.dtype, self.device, kv_dtype=self.kv_cache_dtype)
        if kv_scales is not None:
            scales = kv_scales if isinstance(kv_scales, KVScales) else KVScales.load(kv_scales)
            self.cache.set_kv_scales(scales)
        # How the cache keeps slots: every one (DMC, vanilla), or a budget evicted for real (H2O, TOVA, SnapKV).
        self.policy = NoEviction() if eviction is None else EngineEviction(eviction, self.cache)
        self.runner = ModelRunner(self.model, self.cache, vanilla=self.vanilla, forced_period=forced_period,
                                  policy=self.policy)
        prior = 1.0 if self.vanilla else float(forced_period or self.dmc.target_cr or 1.0)
        self.scheduler = Scheduler(self.cache, max_num_seqs, CompressionEstimate(prior, config.admission_margin),
                                   policy=self.policy, prefill_chunk=prefill_chunk,
                                   whole_prompts=max_num_batched_tokens is not None,
                                   prefill_delay_factor=float(config.prefill_delay_factor),
                                   max_num_batched_tokens=max_num_batched_tokens, eos_token_ids=self.eos_token_ids)
        # Snapshots of prefilled prefixes that later prompts start from (None: off).
        self.prefix_cache = make_prefix_cache(config.enable_prefix_caching, self.cache, eviction=eviction,
                                              forced_period=forced_period)
        self.scheduler.prefix_cache = self.prefix_cache
        self._next_id = 0
        self._forks, self._held = self.scheduler.forks, self.scheduler.held  # the forks held for their parents
        self.step_timer = StepTimer()  # where the steps' time goes, by section (LLM.step_timer.summary())
        self.initial_free_pages = self.cache.free_page_count()
        if config.cuda_graphs:
            self.runner.use_cuda_graphs([b for b in GRAPH_BUCKETS if b < max_num_seqs] + [max_num_seqs])

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); returns one output per prompt, in order.
        A bad request comes back with ``finish_reason == "error"``; the others run."""
        requests = self._submit(prompts, params)
        total = sum(r.params.max_tokens for r in requests if not r.finished)
        with tqdm(total=total, desc="generating", unit="tok", disable=not self._progress or total == 0) as bar:
            while self.has_unfinished():
                before = sum(len(r.output_ids) for r in requests)
                self.step()
                bar.update(sum(len(r.output_ids) for r in requests) - before)
        return [self._output(r) for r in requests]

    def stream(self, prompts, params=None) -> Iterator[RequestOutput]:
        """Like :meth:`generate`, but yields an update whenever a request gets new tokens (its
        ``new_token_ids``/``new_text``) and once more when it finishes. Leaving the loop early
        (``break``, an exception, ``close()``) aborts this call's unfinished requests and frees
        their pages."""
        requests = self._submit(prompts, params)
        try:
            for request in requests:
                if request.finished:
                    yield self._output(request, delta=True)
            while any(not r.finished for r in requests):
                for request in self.step():
                    if request in requests:
                        yield self._output(request, delta=True)
        finally:
            for request in requests:
                self.abort(request)  # no-op for finished ones

    def warmup(self) -> dict:
        """Compile now what the first requests would otherwise compile in the middle of serving: the first-chunk
        prefill attention of every prompt-length bucket (FlexAttention, one kernel per power of two from 128 up
        to ``prefill_chunk``; DMC models on CUDA), alone and packed with another prompt (the document-masked form,
        up to the tokens a step's prefill holds), and the decode step's CUDA graph of every batch-size bucket.
        Runs one throwaway request per bucket (random ids, two tokens); the engine is left as it was: every page
        free, the admission's CR estimate and the request ids untouched. Returns what was run. Call it before
        any request (ValueError otherwise)."""
        if self.has_unfinished():
            raise ValueError("warmup() runs before any request: this engine has unfinished requests")
        estimate, next_id = vars(self.scheduler.estimate).copy(), self._next_id
        cap = min(self.prefill_chunk, self.max_model_len - 2)
        lengths = sorted({min(1 << k, cap) for k in range(7, max(cap, 128).bit_length() + 1)} - {0})
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, seed=0)
        # Several new prompts in one forward take the packed form (FlexAttention with a document mask): a pair of
        # half-bucket prompts per bucket that a step's prefill can hold.
        step_tokens = min(self.prefill_chunk, self.max_num_batched_tokens or self.prefill_chunk)
        pairs = self.scheduler.max_num_seqs >= 2 and not self.vanilla and self.eviction is None
        packed = [n for n in lengths if pairs and 256 <= n <= step_tokens]
        try:
            for n in lengths:  # one at a time, so that each prompt is one chunk of exactly its bucket's length
                self.generate([torch.randint(min(3, vocab - 1), vocab, (n,), generator=gen).tolist()], params)
                if n in packed:
                    self.generate([torch.randint(min(3, vocab - 1), vocab, (n // 2,), generator=gen).tolist()
                                   for _ in range(2)], params)
            graphs = self.runner.capture_graphs()
        finally:
            vars(self.scheduler.estimate).update(estimate)
            self._next_id = next_id
            self.step_timer = StepTimer()  # the warm-up's steps are not the workload's
            self.clear_prefix_cache(reset_stats=True)  # random prompts: nothing to reuse, nothing to count
        return {"prompt_lengths": lengths, "packed_lengths": packed, "graph_buckets": graphs}

    def calibrate_kv_scales(self, prompts: Sequence[str | list[int]],
                            headroom: float = DEFAULT_HEADROOM) -> KVScales:
        """Prefill ``prompts`` (one generated token each) while recording the largest |k|, |v| that every
        (layer, KV head) stores, and return the scales that map ``headroom`` times them to e4m3's 448
        (:mod:`dmc.engine.kv_scales`). An fp8 engine also starts using them; any engine can calibrate scales
        to save (:meth:`KVScales.save`) for an fp8 one. Call it before serving (ValueError with unfinished
        requests); the admission's CR estimate and the request ids are left as they were."""
        if self.has_unfinished():
            raise ValueError("calibrate_kv_scales() runs with no request in flight: this engine has unfinished ones")
        if isinstance(prompts, (str, torch.Tensor)) or not prompts:
            raise ValueError("calibrate_kv_scales() takes a non-empty list of prompts (text or token ids)")
        estimate, next_id = vars(self.scheduler.estimate).copy(), self._next_id
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, seed=0)
        self.cache.observe_kv(True)
        try:
            outputs = self.generate(list(prompts), params)
            amax = self.cache.kv_amax
        finally:
            self.cache.observe_kv(False)
            vars(self.scheduler.estimate).update(estimate)
            self._next_id = next_id
        failed = [o for o in outputs if o.finish_reason == "error"]
        if failed:
            raise ValueError(f"{len(failed)} calibration prompt(s) were refused: {failed[0].error}")
        scales = KVScales.from_amax(*amax, headroom=headroom)
        if self.kv_cache_dtype == torch.float8_e4m3fn:
            self.cache.set_kv_scales(scales)
        return scales

    def clear_prefix_cache(self, reset_stats: bool = False) -> int:
        """Drop every prefix-cache snapshot (their rows and pages are free again), e.g. after the model's weights or
        fp8 scales change; ``reset_stats`` also zeroes :meth:`prefix_cache_stats`' counts. Returns how many were
        dropped (0 with caching off)."""
        if self.prefix_cache is None:
            return 0
        dropped = self.prefix_cache.clear()
        if reset_stats:
            self.prefix_cache.stats = type(self.prefix_cache.stats)()
        return dropped

    def prefix_cache_stats(self) -> dict | None:
        """Prefix caching's counts (None when off): ``queries`` (requests admitted), ``hits`` (of them, those
        started from a snapshot), ``queried_tokens``, ``reused_tokens`` (not prefilled thanks to a snapshot),
        ``hit_rate`` (reused / queried tokens), ``parked`` and ``evicted`` snapshots, the ``snapshots`` kept now
        and the ``snapshot_pages`` they hold."""
        return None if self.prefix_cache is None else self.prefix_cache.summary()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    fork_of: Request | None = None) -> Request:
        """Queue one request (the server's entry point); run :meth:`step` to advance it.

        ``fork_of``: a request with the same prompt (and ``prompt_logprobs``) that has not been prefilled yet, e.g.
        the first of a request's ``n`` choices: this one waits while that one prefills, then starts from a copy of
        its cache and draws its first token from the same logits (with its own seed), so the prompt is prefilled
        once. When that cannot be (no room for the copy then, eviction, another prompt) it is prefilled itself:
        the outputs are the same either way."""
        return self._submit([prompt], [params or SamplingParams()], fork_of)[0]

    def _queue(self, request: Request, fork_of: Request | None) -> None:
        """Queue a valid request, or hold it until ``fork_of`` is prefilled when it can start from its cache."""
        if fork_of is not None and self.scheduler.can_fork(request, fork_of):
            self.scheduler.hold(request, fork_of)
        else:
            self.scheduler.add(request)

    def abort(self, request: Request | int) -> bool:
        """Stop a request now (waiting or running): its pages are freed, it finishes "aborted".
        ``request`` is a :class:`Request` (from :meth:`add_request`) or its id (``request.id``,
        ``RequestOutput.request_id``). Returns False when it had already finished."""
        if isinstance(request, int):
            request_id = request
            request = self.scheduler.get(request_id) or self._held.get(request_id)
            if request is None:
                if not 0 <= request_id < self._next_id:
                    raise ValueError(f"no request has id {request_id} (ids so far: 0 .. {self._next_id - 1})")
                return False  # finished already
        self._held.pop(request.id, None)  # a held fork: the scheduler skips it once finished
        return self.scheduler.abort(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._forks)

    # ------------------------------------------------------------------ one engine step
    def step(self) -> list[Request]:
        """One engine step: prefill a batch of prompt chunks (admitting what fits), decode one token for every
        running request that is past its prefill. Each pass goes one way: the scheduler plans it, the runner runs
        it, the scheduler applies the result (:class:`~dmc.engine.scheduler.SchedulerOutput` says which passes a
        step has). Returns the requests that changed."""
        self.step_timer.steps += 1
        return self._run_step(self.scheduler.step_budget(), decode=True)

    def _prefill_step(self, budget: int | None = None) -> list[Request]:
        """A step's prefill passes only: the chunks the scheduler picks (requests already prefilling go on, then
        newly admitted ones; ``budget`` tokens in all, default ``prefill_chunk``), a request whose whole feed is
        then in the cache getting its first token. Returns the requests that changed (benchmarks and tests time
        and inspect prefill alone)."""
        return self._run_step(self.prefill_chunk if budget is None else budget, decode=False)

    def _run_step(self, budget: int, decode: bool) -> list[Request]:
        """schedule → execute → update, pass after pass, timed by section (:attr:`step_timer`)."""
        timer, scheduler, changed = self.step_timer, self.scheduler, []
        start = time.perf_counter()
        scheduler.begin_step(budget, decode)
        while (output := scheduler.schedule()) is not None:
            start = timer.add("schedule", start)
            result = self.runner.execute(output)
            if output.kind != "none":
                start = timer.add(_SECTIONS[output.kind], start)
            changed += scheduler.update_from_output(output, result)
            # a forward's update waits for the GPU (the CR estimate reads the slots): the prefill's time
            start = timer.add("prefill" if output.kind == "prefill" else "postprocess", start)
        timer.add("schedule", start)
        return changed

    # ------------------------------------------------------------------ request lifecycle
    def _submit(self, prompts, params, fork_of: Request | None = None) -> list[Request]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        requests = []
        for prompt, p in zip(prompts, params):
            request = Request(id=self._next_id, prompt=prompt, prompt_ids=[], params=p,
                              seed=p.seed if p.seed is not None else self._rng.randrange(2**31))
            self._next_id += 1
            try:
                p.validate()
                self._check_logprobs(p)
                request.prompt_ids = self._tokenize(prompt)
                request.logprobs = None if p.logprobs is None else []
                request.prompt_logprobs = None if p.prompt_logprobs is None else [None]
                if self.tokenizer is not None:
                    request.detokenizer = Detokenizer(self.tokenizer, p.stop)
            except ValueError as exc:
                self.scheduler.finish(request, "error", str(exc))
            else:
                self._queue(request, fork_of)
            requests.append(request)
        return requests

    def _check_logprobs(self, params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name}={k} asks for more tokens than the vocabulary has ({vocab})")

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context: max_model_len is "
                             f"{self.max_model_len} (prompt + at least one generated token)")
        return ids

    def _output(self, request: Request, delta: bool = False) -> RequestOutput:
        out = RequestOutput(request_id=request.id, prompt=request.prompt, prompt_token_ids=request.prompt_ids,
                            text=request.text, token_ids=list(request.output_ids), finished=request.finished,
                            finish_reason=request.finish_reason, error=request.error,
                            compression=request.compression, num_preemptions=request.preemptions,
                            logprobs=None if request.logprobs is None else list(request.logprobs),
                            prompt_logprobs=None if request.prompt_logprobs is None else list(request.prompt_logprobs))
        if delta:
            out.new_token_ids = request.output_ids[request.streamed_tokens:]
            if request.logprobs is not None:
                out.new_logprobs = request.logprobs[request.streamed_tokens:]
            end = request.stable_text_length()
            out.new_text = request.text[request.streamed_chars:end]
            request.streamed_tokens, request.streamed_chars = len(request.output_ids), max(request.streamed_chars, end)
        return out

    # ------------------------------------------------------------------ sizing
    @property
    def _slot_cap(self) -> int | None:
        """Slots a head keeps between steps (the eviction budget), None when unbounded."""
        return None if self.eviction is None else self.eviction.budget


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (None: cuda if available, else cpu); ValueError for a name torch
    does not know and for CUDA on a build or machine without it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} asked for, but {why}: use --device cpu (device='cpu')")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) "
                             "are visible")
    return resolved


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None  # token-id prompts still work


def _eos_ids(config, tokenizer) -> set[int]:
    ids = getattr(config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
