"""``dmc.LLM``: batch and streaming generation over the paged per-head DMC cache."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..hf.convert import fold_logit_scale
from ..stats import CompressionStats
from .cache import CacheLayout, OutOfPages, PagedKVCache
from .config import EngineConfig
from .detokenizer import Detokenizer
from .step_timer import StepTimer
from .eviction import EngineEviction
from .kv_scales import DEFAULT_HEADROOM, KVScales
from .logprobs import pack as logprob_pack
from .logprobs import unpack as logprob_unpack
from .params import RequestOutput, SamplingParams, TokenLogprob
from .runner import ModelRunner, load_model
from .sampling import SamplingBatch, sample, to_device
from .scheduler import CompressionEstimate, Request, RequestStatus, Scheduler

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
OUT_OF_MEMORY_PREFILL = ("this request needs more KV-cache memory than the engine has; lower max_tokens (--max-tokens) "
                         "or max_model_len (--max-model-len), or give the cache more memory (kv_cache_memory, "
                         "--kv-cache-memory-gib)")
OUT_OF_MEMORY_DECODING = ("out of KV-cache memory while decoding a single sequence; lower max_tokens (--max-tokens) "
                          "or max_model_len (--max-model-len), or give the cache more memory (kv_cache_memory, "
                          "--kv-cache-memory-gib)")
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
        self.runner = ModelRunner(self.model, self.cache, vanilla=self.vanilla, forced_period=forced_period,
                                  eviction=None if eviction is None else EngineEviction(eviction, self.cache))
        prior = 1.0 if self.vanilla else float(forced_period or self.dmc.target_cr or 1.0)
        self.scheduler = Scheduler(self.cache, max_num_seqs, CompressionEstimate(prior, config.admission_margin),
                                   slot_cap=self._slot_cap, prefill_chunk=prefill_chunk,
                                   whole_prompts=max_num_batched_tokens is not None,
                                   prefill_delay_factor=float(config.prefill_delay_factor))
        self._next_id = 0
        self._forks: dict[int, tuple[Request, list[Request]]] = {}  # parent id -> (parent, forks held for it)
        self._held: dict[int, Request] = {}  # id -> a fork held until its parent is prefilled
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
        to ``prefill_chunk``; DMC models on CUDA) and the decode step's CUDA graph of every batch-size bucket.
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
        try:
            for n in lengths:  # one at a time, so that each prompt is one chunk of exactly its bucket's length
                self.generate([torch.randint(min(3, vocab - 1), vocab, (n,), generator=gen).tolist()], params)
            graphs = self.runner.capture_graphs()
        finally:
            vars(self.scheduler.estimate).update(estimate)
            self._next_id = next_id
            self.step_timer = StepTimer()  # the warm-up's steps are not the workload's
        return {"prompt_lengths": lengths, "graph_buckets": graphs}

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
        if fork_of is not None and self._can_fork(request, fork_of):
            self._forks.setdefault(fork_of.id, (fork_of, []))[1].append(request)
            self._held[request.id] = request
        else:
            self.scheduler.add(request)

    def _can_fork(self, request: Request, parent: Request) -> bool:
        """Whether ``request`` can start from ``parent``'s cache once it is prefilled: same prompt and prompt
        log-probs, ``parent`` queued or prefilling in the scheduler (not itself held for another), no eviction
        (its per-row state is not copied)."""
        in_scheduler = parent.prefilling or (parent.status is RequestStatus.WAITING and parent.id not in self._held)
        return (self.eviction is None and not parent.finished and in_scheduler and not parent.output_ids
                and parent.prompt_ids == request.prompt_ids
                and parent.params.prompt_logprobs == request.params.prompt_logprobs)

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
        self._held.pop(request.id, None)  # a held fork: _fork skips it once finished
        return self.scheduler.abort(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._forks)

    # ------------------------------------------------------------------ one engine step
    def step(self) -> list[Request]:
        """One engine step: schedule, prefill a batch of prompt chunks (admitting what fits), decode one
        token for every running request that is past its prefill, postprocess. Returns the requests
        that changed."""
        timer = self.step_timer
        timer.steps += 1
        if self._forks:
            self._release_orphans()
        budget = self.prefill_chunk
        if self.max_num_batched_tokens is not None:  # the decoding requests' tokens come first
            budget = min(budget, self.max_num_batched_tokens - self.scheduler.decoding_count())
        changed = self._prefill_step(budget) if budget > 0 else []
        start = time.perf_counter()
        batch, starved = self.scheduler.schedule_decode()
        if starved is not None:
            self.scheduler.finish(starved, "error", OUT_OF_MEMORY_DECODING)
            changed.append(starved)
        start = timer.add("schedule", start)
        if batch:
            tokens, logprobs = self._decode(batch)
            start = timer.add("decode", start)
            changed += self._postprocess(batch, tokens, logprobs)
            timer.add("postprocess", start)
        return changed

    def _prefill_step(self, budget: int | None = None) -> list[Request]:
        """This step's batched prefill: the chunks the scheduler picks (requests already prefilling go on,
        then newly admitted ones; ``budget`` tokens in all, default ``prefill_chunk``), in one forward. A request
        whose whole feed is now in the cache gets its first token sampled. Returns the requests that changed.

        With eviction (H2O, TOVA, SnapKV) the chunks run one per forward, each scheduled after the one before
        has been cut to the budget: a batch would hold every chunk's pages at once, uncut."""
        changed: list[Request] = []
        budget = self.prefill_chunk if budget is None else budget
        while budget > 0:
            start = time.perf_counter()
            chunks, starved = self.scheduler.schedule_prefill(budget, None if self.eviction is None else 1)
            if starved is not None:
                self.scheduler.finish(starved, "error", OUT_OF_MEMORY_PREFILL)
                changed.append(starved)
            self.step_timer.add("schedule", start)
            if not chunks:
                break
            changed += self._prefill_chunks(chunks)
            budget -= sum(size for _, size in chunks)
            if self.eviction is None:
                break
        return changed

    def _prefill_chunks(self, chunks: list[tuple[Request, int]]) -> list[Request]:
        """Feed ``(request, tokens)`` chunks in one forward; sample the first token of each request whose
        feed is now all in the cache (those are returned; one asking for ``max_tokens=0`` finishes instead).
        Chunks that hold prompt positions still to score (``prompt_logprobs``) get the logits of those
        positions too; the others keep the fast path's last-token logits only."""
        sched = self.scheduler
        start = time.perf_counter()
        requests = [r for r, _ in chunks]
        feeds = [r.to_feed()[r.seen:r.seen + size] for r, size in chunks]
        at, scored = self._scored_positions(chunks)
        cache_rows, seen = [r.row for r in requests], [r.seen for r in requests]
        logits = (self.runner.prefill_batch(cache_rows, feeds, seen) if at is None
                  else self.runner.prefill_batch(cache_rows, feeds, seen, at=at))
        done = []
        for i, (request, size) in enumerate(chunks):
            request.seen += size
            if request.prefill_left == 0:
                sched.prefilled(request)
                done.append(i)
        if not done and not scored:
            sched.last_prefill_seconds = time.perf_counter() - start  # queued, not waited for (no token to sample)
            self.step_timer.add("prefill", start)
            return []
        finished = [requests[i] for i in done]
        if self.eviction is None and finished:  # with eviction the cap, not a ratio, bounds the pages
            self._observe(finished)
        forks = [(child, done[j]) for child, j in self._fork(finished)] if self._forks else []  # (fork, parent's chunk)
        finished += [child for child, _ in forks]
        draws = [(r, i) for r, i in [(requests[i], i) for i in done] + forks if r.params.max_tokens > 0]
        tokens, logprobs = self._draw_and_score(logits, draws, scored, len(chunks))
        sched.last_prefill_seconds = time.perf_counter() - start  # the forward's time, its GPU work included
        for child, i in forks:
            if child.prompt_logprobs is not None:
                child.prompt_logprobs = list(requests[i].prompt_logprobs)
        start = self.step_timer.add("prefill", start)
        for request in finished:
            if request.params.max_tokens == 0:  # scored only
                self._finish(request, "length")
        self._postprocess([r for r, _ in draws], tokens, logprobs)
        self.step_timer.add("postprocess", start)
        return finished

    def _observe(self, prefilled: list[Request]) -> None:
        """Add the slots of these just prefilled requests to the admission's CR estimate (one wait)."""
        # Pages hold the tokens that went through DMC; a delayed model's raw window is fixed memory.
        rows = to_device([[r.row for r in prefilled]], torch.long, self.device)[0]
        for request, slots in zip(prefilled, self.cache.lens[:, rows].sum(dim=(0, 2)).tolist()):
            committed = request.seen - self.cache.raw_held(request.seen)
            self.scheduler.estimate.observe(committed * self.cache.layout.rows, slots)

    def _draw_and_score(self, logits: torch.Tensor, draws: list[tuple[Request, int]],
                        scored: list[tuple[Request, range]], count: int) -> tuple[list[int], list[TokenLogprob | None]]:
        """A prefill's first tokens: each ``(request, i)`` of ``draws`` samples from row ``i`` of ``logits`` (a fork
        from its parent's), its log-probs if it asks; the ``scored`` prompt positions, whose logits follow the
        ``count`` chunks' last ones, get theirs appended to their requests. One host copy in all."""
        rows = [i for _, i in draws]
        params = [r.params for r, _ in draws]
        tokens = sample(logits[rows], SamplingBatch.build(params, [r.seed for r, _ in draws],
                                                          [len(r.output_ids) for r, _ in draws], self.device))
        targets = [r.prompt_ids[p + 1] for r, positions in scored for p in positions]
        ks = [p.logprobs for p in params]
        if targets:
            tokens = torch.cat([tokens, to_device([targets], torch.long, self.device)[0]])
            rows += range(count, count + len(targets))
            ks += [r.params.prompt_logprobs for r, positions in scored for _ in positions]
        tokens, logprobs = self._to_host(logits[rows], tokens, ks)  # the host waits for the GPU here
        scores = iter(logprobs[len(draws):])
        for request, positions in scored:
            request.prompt_logprobs.extend(next(scores) for _ in positions)
        return tokens[:len(draws)], logprobs[:len(draws)]

    def _fork(self, prefilled: list[Request]) -> list[tuple[Request, int]]:
        """Start the requests held for these just prefilled ones (``fork_of``) from copies of their cache rows, while
        they fit (admission as for any request); the rest go back to the head of the queue, to be prefilled
        themselves. Returns ``(fork, index of its parent in prefilled)``."""
        sched, forks, back = self.scheduler, [], []
        for index, parent in enumerate(prefilled):
            held = self._forks.pop(parent.id, (parent, []))[1]
            for child in held:
                if self._held.pop(child.id, None) is None:
                    continue  # aborted while held
                if back or not sched.can_admit(child, self.cache.free_page_count(), self.cache.free_row_count()):
                    back.append(child)
                    continue
                try:
                    row = self.cache.fork_row(parent.row)
                except OutOfPages:
                    back.append(child)
                    continue
                sched.admit_forked(child, row, parent.seen)
                forks.append((child, index))
        for child in reversed(back):
            sched.requeue(child)
        return forks

    def _release_orphans(self) -> None:
        """Requests held for one that ended before its prefill did (aborted, refused) are prefilled themselves."""
        for parent_id, (parent, held) in list(self._forks.items()):
            if parent.finished:
                del self._forks[parent_id]
                for child in reversed(held):
                    if self._held.pop(child.id, None) is not None:
                        self.scheduler.requeue(child)

    @staticmethod
    def _scored_positions(chunks: list[tuple[Request, int]]) -> tuple[list[int] | None, list[tuple[Request, range]]]:
        """``(at, scored)``: the indices of the batch's packed tokens whose logits the prefill returns (each chunk's
        last, then the positions to score), None when nothing is scored (the fast path); ``scored`` pairs each
        request that scores with its positions."""
        ends = list(itertools.accumulate(size for _, size in chunks))
        at, scored = [end - 1 for end in ends], []
        for (request, size), end in zip(chunks, ends):
            positions = request.unscored(size)
            if positions:
                base = end - size - request.seen  # packed index of the request's position 0 in this chunk
                at += [base + p for p in positions]
                scored.append((request, positions))
        return (at if scored else None), scored

    def _to_host(self, logits: torch.Tensor, tokens: torch.Tensor,
                 ks: list[int | None]) -> tuple[list[int], list[TokenLogprob | None]]:
        """The tokens ``[N]`` on the host and, for rows whose ``ks[i]`` is not None, their log-probs under ``logits``
        with the ``ks[i]`` most likely tokens (:mod:`dmc.engine.logprobs`): one copy for all rows."""
        wanted = [k for k in ks if k is not None]
        if not wanted:
            return tokens.tolist(), [None] * len(ks)
        width = min(max(wanted), logits.shape[-1])
        rows = logprob_pack(logits, tokens, width).tolist()
        return ([int(row[0]) for row in rows],
                [None if k is None else logprob_unpack(row, min(k, width), width) for row, k in zip(rows, ks)])

    def _decode(self, batch: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One decode step of ``batch``: the sampled tokens and, for requests that ask, their log-probs. Every
        input goes to the device before the model is launched, in copies that do not wait for the GPU; the host's
        one wait is for the tokens (and log-probs)."""
        device = self.device
        inputs = to_device([[r.output_ids[-1] for r in batch], [r.seen for r in batch], [r.row for r in batch]],
                           torch.int64, device)
        sampling = SamplingBatch.build([r.params for r in batch], [r.seed for r in batch],
                                       [len(r.output_ids) for r in batch], device)
        logits = self.runner.decode(inputs[0], inputs[1].int(), inputs[2].int())
        for request in batch:
            request.seen += 1
        return self._to_host(logits, sample(logits, sampling), [r.params.logprobs for r in batch])

    def _postprocess(self, requests: list[Request], tokens: list[int],
                     logprobs: list[TokenLogprob | None]) -> list[Request]:
        """Append each request's new token (and its log-probs); finish those that hit a stop or their length."""
        for request, token, logprob in zip(requests, tokens, logprobs):
            if request.logprobs is not None:
                request.logprobs.append(logprob)
            self._append(request, token)
        return list(requests)

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

    def _append(self, request: Request, token: int) -> None:
        request.output_ids.append(token)
        p = request.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            reason = "stop"
        elif len(request.output_ids) >= p.max_tokens or request.seen + 1 >= self.max_model_len:
            reason = "length"
        else:
            reason = None
        detokenizer = request.detokenizer
        if detokenizer is not None:
            detokenizer.update(request.output_ids, final=reason is not None)
            request.text = detokenizer.text
            if detokenizer.stopped:
                reason = "stop"
        if reason is not None:
            self._finish(request, reason)

    def _finish(self, request: Request, reason: str) -> None:
        slots = self.cache.slot_counts(request.row, request.seen).double()[:, None, :]  # [L, 1, H], raw window incl.
        stats = CompressionStats(tokens=torch.full_like(slots, request.seen), slots=slots)
        request.compression = {"tokens": request.seen, "slots": int(slots.sum()), **stats.summary()}
        self.scheduler.finish(request, reason)

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
