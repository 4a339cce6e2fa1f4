"""Runs the model over the paged cache: exact chunked prefill and the batched decode step.

:meth:`ModelRunner.execute` runs one pass the scheduler planned (a prefill forward, its sampling, or a decode
step) and returns what it produced; it reads the requests and never changes them.

Prefill goes through the model's own DMC attention (dmc.hf) with a :class:`SequenceView` of
the paged cache, so it is the same code as the HF path (decisions for all tokens at once,
windowed pooling, FlexAttention on CUDA) and writes the kept slots straight into pages.

The decode step is the engine's own layer loop: the model's projections (q/k/v and gate/up each fused
into one GEMM) and MLPs (cuBLAS), residual adds fused with the RMSNorms (:mod:`dmc.engine.layers`), then one
fused update kernel (decisions, window ring, RoPE, slot write) and the
paged split-K attention (then, for the eviction baselines, :mod:`dmc.engine.eviction`); after
the last layer the allocator tops up pages. Without host syncs it is captured in CUDA graphs, one
per batch-size bucket.

FP8 pages (``kv_cache_dtype="fp8"``): the kernels get the cache's ``k_scale``/``v_scale`` (per layer and KV head) and
quantise the slot they write, dequantise what they read; prefill does the same in the
:class:`SequenceView` (``commit`` and ``visible_slots``, through ``PagedKVCache.store_states``).

Delayed merging (``merge_delay`` w > 0): every head also holds its last w tokens raw, in the cache's
delay ring. A decode step puts the new token there; the token it replaces (w older) goes through the
DMC update with its own α, ω and position; the query attends over the slots and the raw keys in one
softmax. On CUDA those are the kernels of :mod:`dmc.kernels.triton_delayed` (no host sync, so the step
is captured in CUDA graphs like any other); elsewhere their PyTorch twins
(:func:`dmc.kernels.reference.delayed_decode_update_ref`, ``delayed_decode_attention_ref``). A continuing
prefill chunk is the HF path's own ``_attend_cached_delayed`` over the :class:`SequenceView`, which reads and
writes the ring as its ``pending`` window; the first chunks of a batched prefill run packed
(``_inference_packed_delayed``: one pooling and attention over all of them, their slots and ring written in
one call each), leaving the same cache.
"""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import DMCConfig, is_dmc
from ..hf.attention import DMCBatch, PackedChunks
from ..hf.convert import dmc_config_from
from ..hf.modeling import FAMILIES
from ..kernels import get_kernels
from .cache import PagedKVCache, allocate_pages, commit_packed, hold_packed, reserve_packed
from .layers import DecodeOps, fuse_projections
from .logprobs import pack as logprob_pack
from .logprobs import unpack as logprob_unpack
from .params import TokenLogprob
from .policy import CachePolicy, NoEviction
from .sampling import SamplingBatch, host_to_device, sample, to_device
from .scheduler import ModelOutput, Request, SchedulerOutput


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """Load an HF directory as a DMC causal LM. A plain Llama/Mistral/Qwen2/Qwen3 directory loads
    into the DMC class of its family in vanilla mode (every token appends): the like-for-like
    baseline. Returns ``(model, vanilla)``."""
    config = AutoConfig.from_pretrained(model_dir)
    vanilla = not is_dmc(config)
    if vanilla:
        family = next((f for f in FAMILIES if f.model_type == config.model_type), None)
        if family is None:
            supported = ", ".join(f.model_type for f in FAMILIES)
            raise ValueError(f"{model_dir}: model_type {config.model_type!r} is not supported by the engine; "
                             f"supported: {supported} and their DMC versions")
        config = dmc_config_from(config, DMCConfig(), family)
        model = family.dmc_causal_lm_class.from_pretrained(model_dir, config=config, dtype=dtype)
        model.set_dmc_mode(vanilla=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval(), vanilla


def decode_ops(device: torch.device | str) -> SimpleNamespace:
    """The decode step's operations on ``device``: the kernels (:func:`dmc.kernels.get_kernels`)
    and the cache's page allocator (a few tensor ops, no kernel: the same everywhere)."""
    return SimpleNamespace(**vars(get_kernels(device)), allocate_pages=allocate_pages)


def pack_first_chunks(members: list[int], segments: list[tuple[int, int]], rows: list[int], width: int,
                      device, delay: int = 0) -> PackedChunks:
    """The :class:`~dmc.hf.attention.PackedChunks` of the segments ``members`` of a batched prefill (first
    chunks: their rows are empty), whose cache rows are ``rows[i]``; ``width`` = W - 1 entries of window
    state (0: unbounded window); ``delay``: merge_delay w (0: off). Everything is laid out on the host and
    reaches the device in a few pinned copies (four, or with delayed merging up to nine), once per forward."""
    packed = _pack(members, [segments[i] for i in members], rows, 0 if delay else width, device, commit_packed,
                   flex=True)
    if not delay:
        return packed
    # Delayed merging: of a chunk of n tokens the first n - w leave the window (their slots and window state:
    # one write, as first chunks of their own) and the last min(n, w) stay raw in the delay ring.
    leaving = [(i, (lo, hi - delay)) for i, (lo, hi) in zip(members, packed.bounds) if hi - lo > delay]
    if leaving:
        packed.leaving = _pack([i for i, _ in leaving], [r for _, r in leaving], rows, width, device, commit_packed,
                               flex=False)
    # each chunk's last min(n, w) tokens: their packed index, row and ring index (position % w)
    lo, hi = torch.tensor(packed.bounds, dtype=torch.long).view(-1, 2).unbind(1)
    first_held = torch.maximum(lo, hi - delay)
    chunk = torch.repeat_interleave(torch.arange(len(members)), hi - first_held)
    token = torch.arange(int((hi - first_held).sum())) - _exclusive_cumsum(hi - first_held)[chunk] + first_held[chunk]
    hold = host_to_device(torch.stack([token, torch.tensor([rows[i] for i in members])[chunk],
                                       (token - lo[chunk]) % delay]), device)
    packed.delay, packed.held, packed.hold = delay, [min(hi - lo, delay) for lo, hi in packed.bounds], hold_packed
    packed.hold_index, packed.hold_rows, packed.hold_slots = hold[0], hold[1], hold[2]
    return packed


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(0) - x


def _pack(members: list[int], ranges: list[tuple[int, int]], rows: list[int], width: int, device, commit,
          flex: bool) -> PackedChunks:
    """:func:`pack_first_chunks`' layout of the token ranges ``ranges`` (of the tensors its ``select`` reads,
    one per member) back to back; ``flex``: with FlexAttention's document ids. Host tensor ops (a forward packs
    thousands of tokens: per-token Python lists took milliseconds), then a few pinned copies."""
    count = len(members)
    src = torch.tensor(ranges, dtype=torch.long).view(-1, 2)
    sizes = src[:, 1] - src[:, 0]
    lo = _exclusive_cumsum(sizes)
    hi = lo + sizes
    total = int(sizes.sum())
    bounds = list(zip(lo.tolist(), hi.tolist()))
    contiguous = all(ranges[s][1] == ranges[s + 1][0] for s in range(count - 1))
    segment_of_token = torch.repeat_interleave(torch.arange(count), sizes)
    position = torch.arange(total) - lo[segment_of_token]
    row_of_chunk = torch.tensor([rows[i] for i in members], dtype=torch.long)
    per_token = host_to_device(torch.stack([segment_of_token, row_of_chunk[segment_of_token],
                                            (position == 0).long(), position]), device)
    document_ids = None
    if flex:
        bucket = max(128, 1 << (total - 1).bit_length())  # FlexAttention's compiled kernel: one per bucket
        ids = torch.cat([segment_of_token, torch.full((bucket - total,), count, dtype=torch.long)])
        document_ids = host_to_device(ids.to(torch.int32)[None], device)
    per_chunk = host_to_device(torch.stack([lo, hi - 1, row_of_chunk, sizes]), device)
    j = torch.arange(width)
    tail = hi[:, None] - width + j[None, :]  # [S, W-1]: each chunk's last W-1 token indices
    real = tail >= lo[:, None]
    roll = (j[None, :] - (sizes % max(width, 1))[:, None]) % max(width, 1)
    tails = host_to_device(torch.stack([tail.clamp_min(0), real.long(), roll]), device)
    token_index = None if contiguous else host_to_device(src[segment_of_token, 0] + position, device)
    return PackedChunks(
        members=members, bounds=bounds, token_range=(ranges[0][0], ranges[-1][1]) if contiguous else None,
        token_index=token_index, starts=per_token[2:3].bool(), document_ids=document_ids,
        segment_of_token=per_token[0], first=per_chunk[0], last=per_chunk[1], tail_index=tails[0],
        tail_real=tails[1].bool(), rows=per_chunk[2], row_of_token=per_token[1], roll_index=tails[2],
        commit=commit, chunk_lens=per_chunk[3], position_in_chunk=per_token[3])


class ModelRunner:
    """Prefill and decode of one model over one :class:`PagedKVCache`."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, *, vanilla: bool, forced_period: int = 0,
                 policy: CachePolicy | None = None) -> None:
        self.model = model
        self.base = model.model
        self.cache = cache
        # How slots are kept (H2O/TOVA/SnapKV: cut to a budget after prefill chunks and decode steps)
        self.policy = NoEviction() if policy is None else policy
        self.vanilla = vanilla
        self.forced_period = forced_period
        self.dmc = model.dmc_config
        self.delay = cache.layout.delay_width  # merge_delay w (0: off, or vanilla)
        self.kernels = decode_ops(cache.device)
        # The decode step's fused q/k/v and gate/up GEMMs (the modules' weights become views) and fused norms.
        self.decode_layers = [fuse_projections(layer) for layer in self.base.layers]
        self.ops = DecodeOps(cache.device)
        self.graph_buckets: list[int] = []  # batch sizes to capture (lazily, on first use)
        self.graphs: dict[int, _DecodeGraph] = {}
        self._graph_pool = None

    # ------------------------------------------------------------------ one pass of an engine step
    def execute(self, output: SchedulerOutput) -> ModelOutput:
        """Run one pass the scheduler planned (:class:`~dmc.engine.scheduler.SchedulerOutput`): a prefill forward
        (its logits stay on the device), the sampling of its first tokens and scored positions, or a decode step.
        Reads the requests, changes none of them (``Scheduler.update_from_output`` does)."""
        started = time.perf_counter()
        kind = output.kind
        if kind == "prefill":
            return ModelOutput(logits=self._forward(output), started=started)
        if kind == "sample":
            tokens, logprobs, scores = self._draw_and_score(output)
            return ModelOutput(tokens=tokens, logprobs=logprobs, scores=scores, started=output.started)
        if kind == "decode":
            tokens, logprobs = self._decode_requests(output.decode)
            return ModelOutput(tokens=tokens, logprobs=logprobs, started=started)
        return ModelOutput(started=started)

    def _forward(self, output: SchedulerOutput) -> torch.Tensor:
        """A prefill forward of the output's chunks: the logits of each chunk's last token (and of the scored
        positions, when there are any; else the fast path's last-token logits only)."""
        requests = [r for r, _ in output.chunks]
        feeds = [r.to_feed()[r.seen:r.seen + size] for r, size in output.chunks]
        rows, seen = [r.row for r in requests], [r.seen for r in requests]
        if output.at is None:
            return self.prefill_batch(rows, feeds, seen)
        return self.prefill_batch(rows, feeds, seen, at=output.at)

    def _draw_and_score(self, output: SchedulerOutput) -> tuple[list[int], list[TokenLogprob | None],
                                                                  list[TokenLogprob | None]]:
        """A forward's first tokens: each ``(request, i)`` of the draws samples from row ``i`` of its logits (a fork
        from its parent's), with its log-probs if it asks; the scored prompt positions, whose logits follow the
        chunks' last ones, get theirs. One host copy in all. Returns ``(tokens, logprobs, scores)``."""
        logits, draws, device = output.logits, output.draws, self.cache.device
        rows = [i for _, i in draws]
        params = [r.params for r, _ in draws]
        tokens = sample(logits[rows], SamplingBatch.build(params, [r.seed for r, _ in draws],
                                                          [len(r.output_ids) for r, _ in draws], device))
        targets = [r.prompt_ids[p + 1] for r, positions in output.scored for p in positions]
        ks = [p.logprobs for p in params]
        if targets:
            tokens = torch.cat([tokens, to_device([targets], torch.long, device)[0]])
            rows += range(output.score_row, output.score_row + len(targets))
            ks += [r.params.prompt_logprobs for r, positions in output.scored for _ in positions]
        tokens, logprobs = _to_host(logits[rows], tokens, ks)  # the host waits for the GPU here
        return tokens[:len(draws)], logprobs[:len(draws)], logprobs[len(draws):]

    def _decode_requests(self, batch: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One decode step of ``batch``: the sampled tokens and, for requests that ask, their log-probs. Every
        input goes to the device before the model is launched, in copies that do not wait for the GPU; the host's
        one wait is for the tokens (and log-probs)."""
        device = self.cache.device
        inputs = to_device([[r.output_ids[-1] for r in batch], [r.seen for r in batch], [r.row for r in batch]],
                           torch.int64, device)
        sampling = SamplingBatch.build([r.params for r in batch], [r.seed for r in batch],
                                       [len(r.output_ids) for r in batch], device)
        logits = self.decode(inputs[0], inputs[1].int(), inputs[2].int())
        return _to_host(logits, sample(logits, sampling), [r.params.logprobs for r in batch])

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, row: int, token_ids: list[int], seen: int) -> torch.Tensor:
        """Feed ``token_ids`` to sequence ``row`` that already holds ``seen`` tokens; returns the
        logits after the last one ``[V]`` (fp32)."""
        return self._prefill(row, token_ids, seen, logits_to_keep=1)[-1]

    @torch.inference_mode()
    def prefill_logits(self, row: int, token_ids: list[int], seen: int) -> torch.Tensor:
        """:meth:`prefill`, returning the logits after every token ``[n, V]`` (fp32): scoring a text
        through the engine's cache (``benchmarks/kv_fp8_quality.py``)."""
        return self._prefill(row, token_ids, seen, logits_to_keep=0)

    def _prefill(self, row: int, token_ids: list[int], seen: int, logits_to_keep: int) -> torch.Tensor:
        self.cache.check_room([len(token_ids)])
        view = self.policy.sequence_view(self.cache, row, seen)
        ids = torch.tensor([token_ids], device=self.cache.device)
        out = self.model(input_ids=ids, past_key_values=view, use_cache=True, logits_to_keep=logits_to_keep,
                         dmc_forced_period=self.forced_period)
        return out.logits[0].float()

    @torch.inference_mode()
    def prefill_batch(self, rows: list[int], chunks: list[list[int]], seen: list[int],
                      at: list[int] | None = None) -> torch.Tensor:
        """Feed ``chunks[i]`` to sequence ``rows[i]`` (which holds ``seen[i]`` tokens), all in one forward;
        returns the logits after each chunk's last token ``[B, V]`` (fp32), or with ``at`` after the tokens
        at those indices of the chunks laid back to back ``[len(at), V]`` (prompt log-probs need more than
        the last: the head runs only over what is asked for).

        The chunks are packed back to back in one row (no padding): norms, projections and MLPs run once
        over all their tokens; each layer's attention runs per chunk on its sequence's cache view
        (:meth:`dmc.hf.attention.DMCAttention.forward_packed`), the code :meth:`prefill` runs, so the
        cache ends exactly as if each chunk had been prefilled alone (spec §7.4). Raises OutOfPages
        unless every chunk fits even if nothing merges."""
        cache = self.cache
        sizes = [len(c) for c in chunks]
        cache.check_room(sizes)
        device = cache.device
        # Host lists reach the GPU in non-blocking pinned copies (a torch.tensor(list, device=cuda) makes the
        # host wait for the queued work); the segment bounds stay on the host.
        ends = list(itertools.accumulate(sizes))
        segments = [(end - n, end) for end, n in zip(ends, sizes)]
        ids = to_device([[t for c in chunks for t in c]], torch.long, device)
        positions = to_device([[s + i for s, n in zip(seen, sizes) for i in range(n)]], torch.long, device)
        last = to_device([ends], torch.long, device)[0] - 1 if at is None else to_device([at], torch.long, device)[0]
        views = [self.policy.sequence_view(cache, row, s) for row, s in zip(rows, seen)]
        runtime = self.model.dmc_runtime
        batches = []
        for s, n in zip(seen, sizes):
            starts = torch.zeros(1, n, dtype=torch.bool, device=device)
            if s == 0:
                starts[:, :1].fill_(True)  # a sequence's first token always appends (a fill: no host copy)
            batches.append(DMCBatch(starts=starts, vanilla=runtime.vanilla, channel_scale=runtime.channel_scale,
                                    forced_period=self.forced_period))
        # Sequences starting here run as one packed group in every layer (when the policy allows). Without
        # delayed merging a chunk alone takes the same kernels unpacked; with it, a chunk alone would take the
        # dense path of continuing chunks (its mask materialised), so even one first chunk is packed.
        window = cache.layout.window
        fresh = [i for i, s in enumerate(seen) if s == 0]
        packed = None
        packable = self.policy.packs_first_chunks and (window is None or window > 1)
        if packable and len(fresh) > (0 if self.delay else 1):
            packed = pack_first_chunks(fresh, segments, rows, 0 if window is None else window - 1, device,
                                       self.delay)
        if packed is not None:
            reserve_packed(cache, packed)  # every layer's pages at once; trimmed after the layers
        hidden = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(hidden, positions)
        layers = self.base.layers
        x = layers[0].input_layernorm(hidden)
        for index, layer in enumerate(layers):
            attn_out = layer.self_attn.forward_packed(x, (cos, sin), positions, segments,
                                                      [view.layers[index] for view in views], batches, packed)
            # as in the decode step: residual adds fused with the next norm, the MLP's gate/up in one GEMM
            hidden, x = self.ops.add_norm(hidden, attn_out, layer.post_attention_layernorm)
            following = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.base.norm
            hidden, x = self.ops.add_norm(hidden, self.ops.mlp(layer, self.decode_layers[index], x), following)
        logits = self.model.lm_head(x[0, last]).float()
        if packed is not None:
            cache.trim(packed.rows)
        return logits

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        """One token for each row (``seq_ids`` -1: padding row). Returns logits ``[B, V]`` fp32."""
        bucket = min((size for size in self.graph_buckets if size >= token_ids.shape[0]), default=None)
        if bucket is None:
            return self._decode_eager(token_ids, positions, seq_ids)
        return self._graph(bucket).replay(token_ids, positions, seq_ids)

    def _graph(self, bucket: int) -> "_DecodeGraph":
        if bucket not in self.graphs:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            self.graphs[bucket] = _DecodeGraph(self, bucket, self._graph_pool)
        return self.graphs[bucket]

    @torch.inference_mode()
    def capture_graphs(self) -> list[int]:
        """Capture the decode graph of every batch-size bucket now (each is otherwise captured the first time a
        batch needs it, in the middle of serving); the capture runs padding rows only, touching no sequence.
        Returns the buckets."""
        for bucket in self.graph_buckets:
            self._graph(bucket)
        return list(self.graph_buckets)

    def _decode_eager(self, token_ids, positions, seq_ids) -> torch.Tensor:
        cache, k = self.cache, self.kernels
        hidden = self.base.embed_tokens(token_ids)  # [B, hidden]
        b = hidden.shape[0]
        cos, sin = self.base.rotary_emb(hidden[:, None], positions.long()[:, None])
        cos, sin = cos[:, 0], sin[:, 0]
        scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)  # [L, H]; used only by fp8 pools
        if self.delay:
            leave_cos, leave_sin = self._enter_delay_ring(hidden, cos, sin, positions, seq_ids)
        layers = self.base.layers
        x = layers[0].input_layernorm(hidden)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            q, key, value = self.decode_layers[index].qkv(x)
            q = _heads(q, attn.q_norm, attn.head_dim)
            key = _heads(key, attn.k_norm, attn.head_dim)
            value = value.view(b, -1, attn.head_dim)
            if self.delay:
                q_rot, _ = k.delayed_decode_update(
                    q, key, value, cos, sin, leave_cos, leave_sin, seq_ids, positions, index, cache.k_pool,
                    cache.v_pool, cache.page_table, cache.lens, cache.ring, cache.ring_kv, cache.ring_w,
                    cache.delay_kv, cache.delay_aw, init_offset=self.dmc.init_offset, window=self.dmc.window,
                    page_size=cache.layout.page_size, forced_period=self.forced_period, **scales)
                out = k.delayed_decode_attention(q_rot, cache.k_pool, cache.v_pool, cache.page_table, cache.lens,
                                                 seq_ids, positions, index, attn.scaling, cache.layout.page_size,
                                                 cache.delay_kv, cache.delay_rope, **scales)
            else:
                q_rot, _ = k.decode_update(
                    q, key, value, cos, sin, seq_ids, positions, index, cache.k_pool, cache.v_pool, cache.page_table,
                    cache.lens, cache.ring, cache.ring_kv, cache.ring_w, init_offset=self.dmc.init_offset,
                    window=self.dmc.window,
                    vanilla=self.vanilla, page_size=cache.layout.page_size, forced_period=self.forced_period,
                    **scales)
                out = k.paged_decode_attention(q_rot, cache.k_pool, cache.v_pool, cache.page_table, cache.lens,
                                               seq_ids, index, attn.scaling, cache.layout.page_size, **scales)
            self.policy.after_decode(index, q_rot, seq_ids, positions, attn.scaling)
            # residual adds fused with the norm that follows (the next layer's input norm, or the final norm)
            hidden, x = self.ops.add_norm(hidden, attn.o_proj(out.reshape(b, -1)), layer.post_attention_layernorm)
            following = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.base.norm
            hidden, x = self.ops.add_norm(hidden, self.ops.mlp(layer, self.decode_layers[index], x), following)
        logits = self.model.lm_head(x).float()
        k.allocate_pages(cache.lens, cache.page_table, seq_ids, cache.free_pages, cache.free_top,
                         cache.layout.page_size)
        return logits

    def _enter_delay_ring(self, hidden, cos, sin, positions, seq_ids):
        """Delayed merging, once per step (the tables are per row, not per layer): the new tokens' RoPE
        tables go into their rows' delay ring; returns those of the tokens that leave it (w older, clamped
        at position 0 where none leaves), ``[B, D]`` each. Tensor ops only (no host sync: capturable)."""
        cache = self.cache
        leave_cos, leave_sin = self.base.rotary_emb(hidden[:, None], (positions.long() - self.delay).clamp_min(0)[:, None])
        rows = torch.where(seq_ids >= 0, seq_ids.long(), cache.scratch_row)  # padding rows: the scratch row
        cache.delay_rope[rows, positions.long() % self.delay] = torch.stack([cos, sin], 1).to(cache.dtype)
        return leave_cos[:, 0], leave_sin[:, 0]

    # ------------------------------------------------------------------ CUDA graphs
    def use_cuda_graphs(self, batch_sizes: list[int]) -> None:
        """Replay the decode step from CUDA graphs, one per batch-size bucket, each captured the
        first time a batch needs it; padding rows (seq id -1) fill a batch up to its bucket (delayed
        merging included: its padding rows write only the cache's scratch row)."""
        if self.cache.device.type == "cuda":
            self.graph_buckets = sorted(batch_sizes)


def _to_host(logits: torch.Tensor, tokens: torch.Tensor,
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


def _heads(x: torch.Tensor, norm, head_dim: int) -> torch.Tensor:
    """A projection's output ``[B, heads·D]`` as ``[B, heads, D]``, through the per-head norm (Qwen3) if any."""
    out = x.view(x.shape[0], -1, head_dim)
    return norm(out) if norm is not None else out


class _DecodeGraph:
    """One captured decode step with static input and output buffers."""

    def __init__(self, runner: ModelRunner, size: int, pool) -> None:
        device = runner.cache.device
        self.token_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.int32, device=device)
        self.seq_ids = torch.full((size,), -1, dtype=torch.int32, device=device)
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels); rows are padding
                    runner._decode_eager(self.token_ids, self.positions, self.seq_ids)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):  # one memory pool for all buckets
                self.logits = runner._decode_eager(self.token_ids, self.positions, self.seq_ids)

    def replay(self, token_ids, positions, seq_ids) -> torch.Tensor:
        n = token_ids.shape[0]
        self.token_ids[:n].copy_(token_ids)
        self.positions[:n].copy_(positions)
        self.seq_ids[:n].copy_(seq_ids)
        self.seq_ids[n:].fill_(-1)
        self.graph.replay()
        return self.logits[:n]
