"""DMC self-attention for Hugging Face decoder layers, in three modes.

- training (``module.training``): Gumbel-sigmoid decisions, soft windowed pooling, the
  ``log(1 - α̃_{j+1})`` key bias (spec §4);
- full-sequence eval (no cache): hard decisions and the §3 mask, the oracle;
- incremental (a :class:`~dmc.hf.cache.DMCCache`): chunks of any length extend the cache
  exactly as token-by-token decoding would (spec §2, §7.4).

The module adopts the projections (and Qwen3's q/k norms) of the layer it replaces, so
parameter names and values are those of the original model: DMC adds no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from .. import core
from ..config import DMCConfig
from .cache import PENDING_DIMS
from .runtime import DMCRuntime


@dataclass
class DMCBatch:
    """Per-forward information shared by every DMC attention layer.

    Attributes:
        valid: ``[B, n]`` bool, False for padding tokens, or None (all real).
        starts: ``[B, n]`` bool, True where α is forced to 0 (sequence/document starts).
        document_ids: ``[B, n]`` document index of each token in a packed row, or None.
        vanilla: plain attention (α forced to append, channel D-1 kept and scaled).
        channel_scale: multiplier of q[D-1] and k[D-1] in vanilla mode (zero-out stage).
        noise: training-mode logistic noise ``[layers, B, H, n]``, drawn once per forward so that
            activation checkpointing recomputes a layer with the same noise.
        forced_period: benchmarks only (the engine's ``forced_period``): > 0 replaces the decision
            channel by α_t = 1[t % period != 0], so random weights compress at exactly CR = period.
        hard: training with the inference forward: hard decisions ``1[a > 0]`` (no noise) for the
            pooling and the §3 mask, so the training loss is the inference loss; the decisions
            still get gradients through the pooling and the compression loss (straight-through).
    """

    valid: torch.Tensor | None = None
    starts: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    vanilla: bool = False
    channel_scale: float = 1.0
    noise: torch.Tensor | None = None
    hard: bool = False
    forced_period: int = 0
    block_mask: object = None  # FlexAttention's mask, built by the first layer that needs it


@dataclass
class PackedChunks:
    """Several sequences' first chunks (each on an empty cache) among the segments of a packed inference
    forward, the engine's batched prefill: each layer runs their decisions, pooling and attention once over
    all of them, and writes their cache rows in one call (:meth:`DMCAttention.forward_packed`). Built once
    per forward by the engine (:func:`dmc.engine.runner.pack_first_chunks`); every layer reads it.

    Exact: a chunk's first token appends (``starts``), so no group of the pooling reaches into the chunk
    before it, and each chunk's queries see only its own keys (``document_ids``): every chunk gets what
    it gets when fed alone (spec §7.4). Device tensors are built on the host, copied once.

    Attributes:
        members: the chunks' indices among the forward's segments (in order).
        bounds: each chunk's token range within the packed tokens ``[lo, hi)``.
        token_range: the packed tokens' range in the forward's row when they are contiguous, else None
            and ``token_index`` (``[n]`` long) lists them.
        starts: ``[1, n]`` bool, True at each chunk's first token.
        document_ids: ``[1, bucket]`` int32, the chunk of each token, right-padded to a power-of-two bucket (the
            compiled FlexAttention exists once per bucket) with one more id for the padding (None in ``leaving``).
        segment_of_token: ``[n]`` long; ``first``, ``last``: ``[S]`` long, each chunk's first/last token.
        tail_index, tail_real: ``[S, W-1]``, each chunk's last W-1 token indices (clamped at 0) and
            whether each lies in the chunk: the window state after it (bounded windows; else ``[S, 0]``).
        rows: ``[S]`` long, the chunks' cache rows (for the cache's writes); ``row_of_token`` ``[n]``;
            ``roll_index``: ``[S, W-1]`` long, where each entry of the window state goes in its ring.
        commit: ``commit(layer_caches, packed, alpha, k_bar, v_bar, importance, k, v, sums)``, the cache's
            write of all the chunks of one layer (``k``, ``v``: pre-RoPE, channel D-1 zeroed; ``sums``: the pooled
            sums, None on the fused pooling path).
        chunk_lens, position_in_chunk, reserved, vanilla_slots, vanilla_lens: the engine's page reservation for all the layers
            at once (:func:`dmc.engine.cache.reserve_packed`): each layer's commit then only writes.
        delay: merge_delay w (0: off). With delayed merging a chunk of n tokens sends its first n - w through
            DMC (they leave the window) and keeps its last min(n, w) raw in the delay ring, as
            :meth:`DMCAttention._attend_cached_delayed` does for it alone. Then ``leaving`` describes the
            tokens that leave the window (None when no chunk is longer than w): a group of its own over the
            packed tokens (its ``select`` takes them from the packed ones, its ``members``, ``bounds``, ``first``,
            ``last``, ``rows``, ``row_of_token``, ``segment_of_token``, ``tail_*`` and ``roll_index`` are those
            of the chunks longer than w, restricted to those tokens), whose ``commit`` writes their slots and
            window state; this group's own ``commit``, ``tail_*`` and ``roll_index`` are then unused.
        held: each chunk's raw tokens, min(n, w); ``hold_index``, ``hold_rows``, ``hold_slots``: ``[p]`` long, the
            packed tokens that stay raw, their cache rows and ring indices (position % w);
            ``hold(layer_caches, packed, k, v, alpha, importance, cos, sin)`` writes them into the ring.
    """

    members: list[int]
    bounds: list[tuple[int, int]]
    token_range: tuple[int, int] | None
    token_index: torch.Tensor | None
    starts: torch.Tensor
    document_ids: torch.Tensor | None
    segment_of_token: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    tail_index: torch.Tensor
    tail_real: torch.Tensor
    rows: torch.Tensor
    row_of_token: torch.Tensor
    roll_index: torch.Tensor
    commit: object
    block_mask: object = None  # FlexAttention's document mask, built by the first layer
    delay: int = 0
    leaving: "PackedChunks | None" = None
    held: list[int] | None = None
    hold_index: torch.Tensor | None = None
    hold_rows: torch.Tensor | None = None
    hold_slots: torch.Tensor | None = None
    hold: object = None
    chunk_lens: torch.Tensor | None = None  # [S] long: each chunk's tokens
    position_in_chunk: torch.Tensor | None = None  # [n] long: each token's index in its chunk
    reserved: bool = False  # the chunks' pages are taken for every layer before the forward (reserve_packed)
    vanilla_slots: torch.Tensor | None = None  # [L, H * n]: vanilla's pool addresses of every token, all layers
    vanilla_lens: torch.Tensor | None = None  # [S, 1] int32: vanilla's slots per head after each chunk

    def select(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The packed tokens of ``x`` along ``dim``."""
        if self.token_range is not None:
            lo, hi = self.token_range
            return x.narrow(dim, lo, hi - lo)
        return x.index_select(dim, self.token_index)

    def source(self, index: torch.Tensor) -> torch.Tensor:
        """Where the tokens ``index`` (among this group's) lie in the tensor :meth:`select` takes them from."""
        if self.token_range is not None:
            return index + self.token_range[0]
        return self.token_index[index]


class DMCAttention(nn.Module):
    """Drop-in replacement for ``LlamaAttention``/``MistralAttention``/``Qwen2Attention``/
    ``Qwen3Attention`` that computes DMC (see module docstring).

    The DMC settings are read from ``runtime``, the :class:`~dmc.hf.runtime.DMCRuntime` of the model
    (one object shared by all its layers; without one, the layer gets its own from ``config.dmc``).
    """

    def __init__(self, base: nn.Module, config, runtime: DMCRuntime | None = None) -> None:
        super().__init__()
        self.layer_idx = base.layer_idx
        self.head_dim = base.head_dim
        self.scaling = base.scaling
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.q_norm = getattr(base, "q_norm", None)  # Qwen3: per-head RMSNorm before RoPE
        self.k_norm = getattr(base, "k_norm", None)
        self.runtime = runtime if runtime is not None else DMCRuntime.from_dmc_dict(config.dmc)
        # This forward's α (training: straight-through α̂), [B, H, n], collected by the model.
        # An attribute, not a kwarg: FSDP2 rebuilds forward inputs when it casts them.
        self.decisions: torch.Tensor | None = None
        self.decision_logits: torch.Tensor | None = None  # eval mode: a = s·k[D-1] - c, [B, H, n]

    @property
    def dmc(self) -> DMCConfig:
        """The model's DMC config (parsed once, shared by every layer)."""
        return self.runtime.config

    def _heads(self, proj: nn.Linear, norm: nn.Module | None, hidden: torch.Tensor,
               channel_scale: float = 1.0) -> torch.Tensor:
        b, n, _ = hidden.shape
        x = proj(hidden).view(b, n, -1, self.head_dim)
        # μ scales what the q/k_proj rows of channel D-1 produce, before Qwen3's norms, so that
        # μ = 0 is exactly the state after zero_decision_channels.
        x = core.scale_last_channel(x, channel_scale)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        dmc_batch: DMCBatch | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        batch = dmc_batch if dmc_batch is not None else DMCBatch()
        b, n, _ = hidden_states.shape
        scale = batch.channel_scale if batch.vanilla else 1.0
        q = self._heads(self.q_proj, self.q_norm, hidden_states, scale)
        k = self._heads(self.k_proj, self.k_norm, hidden_states, scale)
        v = self._heads(self.v_proj, None, hidden_states)
        cos, sin = position_embeddings
        training = self.training and past_key_values is None

        if training and not batch.vanilla:
            states = training_states
            if q.is_cuda and self.runtime.compile_pooling:
                states = _compiled("training_states", training_states)
            noise = None if batch.noise is None else batch.noise[self.layer_idx]
            q, k_bar, v_bar, alpha_hat, key_bias = states(
                q, k, v, noise, batch.starts, batch.valid, cos, sin, self.dmc.init_offset, self.dmc.temperature,
                self.dmc.window, self.dmc.logit_scale, batch.hard)
            self.decisions = alpha_hat
            if self.dmc.merge_delay:
                out = self._attend_delayed(q, k_bar, v_bar, *raw_states(k, v, cos, sin), key_bias, batch)
            else:
                out = self._attend(q, k_bar, v_bar, key_bias, batch)
            return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None

        layer_cache = None if past_key_values is None else past_key_values.layers[self.layer_idx]
        out = self._inference(q, k, v, cos, sin, kwargs.get("position_ids"), layer_cache, batch)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out), None

    def forward_packed(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                       position_ids: torch.Tensor, segments: list[tuple[int, int]], layer_caches: list,
                       batches: list[DMCBatch], packed: PackedChunks | None = None) -> torch.Tensor:
        """Inference over several sequences' chunks packed in one row (the engine's batched prefill).

        ``hidden_states`` ``[1, N, hidden]`` holds the chunks back to back; segment s is the token range
        ``segments[s]`` of one sequence, on top of its own cache layer ``layer_caches[s]``, with its own
        :class:`DMCBatch` (starts, mode). The projections run once over all N tokens. The first chunks
        that ``packed`` names (sequences with an empty cache) run their decisions, pooling, attention and
        cache writes once for all of them (:meth:`_inference_packed`); every other segment runs exactly
        the code a chunk fed alone takes (:meth:`_inference`). Either way the caches end as if each chunk
        had been fed alone. Returns the attention output after ``o_proj``, ``[1, N, hidden]``.
        """
        first = batches[0]
        scale = first.channel_scale if first.vanilla else 1.0
        q = self._heads(self.q_proj, self.q_norm, hidden_states, scale)
        k = self._heads(self.k_proj, self.k_norm, hidden_states, scale)
        v = self._heads(self.v_proj, None, hidden_states)
        cos, sin = position_embeddings
        outs: list[torch.Tensor | None] = [None] * len(segments)
        if packed is not None:
            take = packed.select
            out = self._inference_packed(take(q, 2), take(k, 2), take(v, 2), take(cos, 1), take(sin, 1),
                                         take(position_ids, 1), layer_caches, packed, batches[packed.members[0]])
            for i, (lo, hi) in zip(packed.members, packed.bounds):
                outs[i] = out[:, :, lo:hi]
        for i, ((start, end), layer_cache, batch) in enumerate(zip(segments, layer_caches, batches)):
            if outs[i] is None:
                s = slice(start, end)
                outs[i] = self._inference(q[:, :, s], k[:, :, s], v[:, :, s], cos[:, s], sin[:, s],
                                          position_ids[:, s], layer_cache, batch)
        self.decisions = self.decision_logits = None  # per segment; nothing collects them here
        if packed is None or len(packed.members) < len(segments):  # else the packed output is the whole row
            out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return self.o_proj(out.transpose(1, 2).reshape(1, hidden_states.shape[1], -1))

    def _inference_packed(self, q, k, v, cos, sin, positions, layer_caches, packed: PackedChunks,
                          batch: DMCBatch) -> torch.Tensor:
        """The first chunks of ``packed`` (``q``, ``k``, ``v`` ``[1, heads, n, D]`` pre-RoPE, their tokens
        back to back): what :meth:`_attend_cached` does for each chunk on an empty cache (hard decisions,
        windowed pooling with no prefix, the §3 mask), once over all of them, the mask kept within each
        chunk; then ``packed.commit`` writes all their cache rows (``layer_caches``: the forward's, one per
        segment). Delayed merging: :meth:`_inference_packed_delayed`. Returns ``[1, H*G, n, D]``."""
        if packed.delay:
            return self._inference_packed_delayed(q, k, v, cos, sin, positions, layer_caches, packed, batch)
        b, h, n, _ = k.shape
        window = self.dmc.window
        sums = None
        if batch.vanilla:
            alpha = torch.zeros(b, h, n, device=q.device)
            importance = torch.ones_like(alpha)
            q, k_bar = apply_rotary_pos_emb(q, k, cos, sin)
            v_bar, plain = v, DMCBatch(vanilla=True)
            # plain causal attention per chunk (SDPA's flash kernel: faster than a masked packed kernel)
            out = torch.cat([self._attend(q[:, :, lo:hi], k_bar[:, :, lo:hi], v_bar[:, :, lo:hi],
                                          alpha[..., lo:hi], plain) for lo, hi in packed.bounds], dim=2)
        else:
            q, k, logits, importance = core.split_decision_channel(q, k, self.dmc.init_offset, self.dmc.logit_scale)
            alpha = core.inference_decisions(logits, packed.starts, positions.expand(b, n), batch.forced_period)
            k_bar, v_bar, sums = self._pool_first_chunks(k, v, importance, alpha, cos, sin)
            q = core.zero_last_channel(_rope_q(q, cos, sin))
            out = self._attend_packed(q, k_bar, v_bar, core.key_bias_from_hard(alpha), packed)
        packed.commit([layer_caches[i] for i in packed.members], packed, alpha, k_bar, v_bar, importance, k, v, sums)
        return out

    def _pool_first_chunks(self, k, v, importance, alpha, cos, sin):
        """Pooled states ``(k̄, v̄, sums)`` of packed first chunks (no window prefix; a chunk's first token
        appends, so no group reaches into the chunk before it): the Triton pooling on CUDA for a bounded
        window (``sums`` None), else the PyTorch one."""
        window = self.dmc.window
        no_prefix = k.new_zeros(*k.shape[:2], 0, 2 * k.shape[-1] + 1, dtype=torch.float32)
        if k.is_cuda and window is not None and window > 1:
            from ..kernels.triton_kernels import chunk_states  # here: triton is optional on a CPU
            return (*chunk_states(k, v, importance, alpha, no_prefix, cos, sin, window), None)
        sums = core.pool_with_prefix(alpha, core.weighted_terms(importance, k, v), window, no_prefix)
        return (*pooled_keys(sums, cos, sin, k.dtype), sums)

    def _inference_packed_delayed(self, q, k, v, cos, sin, positions, layer_caches, packed: PackedChunks,
                                  batch: DMCBatch) -> torch.Tensor:
        """:meth:`_inference_packed` with delayed merging (``merge_delay`` w > 0): what
        :meth:`_attend_cached_delayed` does for each chunk on an empty cache, once over all of them.

        One decision split and one pooling over all the packed tokens (a token's pooled state depends only on
        its chunk's tokens up to it, so the states of the tokens that leave the window are those the chunk
        alone computes for them; the others' are never seen); attention with the delayed mask (pooled state j
        iff j <= i - w, raw key j iff i - w < j <= i) within each chunk; then the first n - w tokens of every
        chunk are committed in one write (``packed.leaving``: slots and window state) and its last min(n, w)
        raw ones go into the delay ring in another (``packed.hold``)."""
        b, h, n, _ = k.shape
        q, k, logits, importance = core.split_decision_channel(q, k, self.dmc.init_offset, self.dmc.logit_scale)
        alpha = core.inference_decisions(logits, packed.starts, positions.expand(b, n), batch.forced_period)
        k_bar, v_bar, sums = self._pool_first_chunks(k, v, importance, alpha, cos, sin)
        k_raw, v_raw = raw_states(k, v, cos, sin)
        q = core.zero_last_channel(_rope_q(q, cos, sin))
        out = self._attend_packed_delayed(q, k_bar, v_bar, k_raw, v_raw, core.key_bias_from_hard(alpha), packed)
        leave = packed.leaving
        if leave is not None:
            # The leaving tokens gathered back to back, as each chunk's commit sees them: the last leaving token
            # of a chunk ends its slot whatever the raw token after it decides (that one merges, if it does, when
            # it leaves the window), and the next leaving token is another chunk's first (α = 0).
            take = leave.select
            leave.commit([layer_caches[i] for i in leave.members], leave, take(alpha, 2), take(k_bar, 2),
                         take(v_bar, 2), take(importance, 2), take(k, 2), take(v, 2),
                         None if sums is None else take(sums, 2))
        packed.hold([layer_caches[i] for i in packed.members], packed, k, v, alpha, importance, cos, sin)
        return out

    def _attend_packed_delayed(self, q, k_bar, v_bar, k_raw, v_raw, key_bias, packed: PackedChunks) -> torch.Tensor:
        """The delayed-merging attention of packed first chunks (:meth:`_attend_delayed` of each chunk alone).
        FlexAttention runs once over all of them with the delayed mask within ``packed.document_ids`` (built
        once per forward), padded to its bucket (the padding is a document of its own, each padding query
        seeing at least its own raw key); the other implementations, which materialise the mask, run per
        chunk."""
        n = q.shape[-2]
        impl = self.runtime.attn_implementation
        if impl == "auto":
            impl = _auto_attention(q)
        if impl != "flex":
            return torch.cat([self._attend_delayed(q[:, :, lo:hi], k_bar[:, :, lo:hi], v_bar[:, :, lo:hi],
                                                   k_raw[:, :, lo:hi], v_raw[:, :, lo:hi], key_bias[..., lo:hi],
                                                   DMCBatch()) for lo, hi in packed.bounds], dim=2)
        size = packed.document_ids.shape[-1]
        if size != n:
            pad = (0, 0, 0, size - n)
            q, k_bar, v_bar, k_raw, v_raw = (F.pad(x, pad) for x in (q, k_bar, v_bar, k_raw, v_raw))
            key_bias = F.pad(key_bias, (0, size - n), value=float("-inf"))
        if packed.block_mask is None:
            packed.block_mask = delayed_block_mask(packed.document_ids, 1, size, packed.delay, q.device)
        return flex_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, packed.delay, self.scaling,
                                   packed.block_mask)[..., :n, :]

    def _attend_packed(self, q, k_bar, v_bar, key_bias, packed: PackedChunks) -> torch.Tensor:
        """The §3 attention of packed first chunks, each within its own chunk. FlexAttention runs once over
        all of them with the document mask of ``packed.document_ids`` (built once per forward), padded to its
        bucket (the padding is a document of its own); the other implementations, which materialise the
        mask (O(n²) for n packed tokens), run per chunk."""
        n = q.shape[-2]
        impl = self.runtime.attn_implementation
        if impl == "auto":
            impl = _auto_attention(q)
        if impl != "flex":
            return torch.cat([self._attend(q[:, :, lo:hi], k_bar[:, :, lo:hi], v_bar[:, :, lo:hi], key_bias[..., lo:hi],
                                           DMCBatch()) for lo, hi in packed.bounds], dim=2)
        size = packed.document_ids.shape[-1]
        if size != n:
            pad = (0, 0, 0, size - n)
            q, k_bar, v_bar = F.pad(q, pad), F.pad(k_bar, pad), F.pad(v_bar, pad)
            key_bias = F.pad(key_bias, (0, size - n), value=float("-inf"))
        if packed.block_mask is None:
            packed.block_mask = causal_block_mask(packed.document_ids, 1, size, q.device)
        return flex_attend(q, k_bar, v_bar, key_bias, packed.document_ids, self.scaling, packed.block_mask)[..., :n, :]

    def _inference(self, q, k, v, cos, sin, positions, layer_cache, batch: DMCBatch) -> torch.Tensor:
        """Hard decisions, then the cached (``layer_cache`` given) or full-sequence attention of eval mode.
        ``q``, ``k``, ``v`` ``[B, heads, n, D]`` pre-RoPE; returns ``[B, H*G, n, D]`` before ``o_proj``."""
        b, _, n, _ = k.shape
        if batch.vanilla:
            alpha = torch.zeros(b, self.num_kv_heads, n, device=q.device)
            importance = torch.ones_like(alpha)
        else:
            q, k, logits, importance = core.split_decision_channel(q, k, self.dmc.init_offset,
                                                                   self.dmc.logit_scale)
            self.decision_logits = logits.detach()  # diagnostics: per-head logit statistics
            alpha = core.inference_decisions(logits, batch.starts, None if positions is None else positions.expand(b, n),
                                             batch.forced_period)
        if batch.valid is not None:
            importance = importance * batch.valid[:, None, :]
            alpha = alpha.masked_fill(~batch.valid[:, None, :], 1.0)  # padding is transparent
        self.decisions = alpha

        if layer_cache is not None and self.dmc.merge_delay and not batch.vanilla:
            return self._attend_cached_delayed(q, k, v, alpha, importance, cos, sin, layer_cache, batch)
        if layer_cache is not None:
            return self._attend_cached(q, k, v, alpha, importance, cos, sin, layer_cache, batch)
        return self._attend_full(q, k, v, alpha, importance, cos, sin, batch)

    def _attend_full(self, q, k, v, alpha, importance, cos, sin, batch: DMCBatch) -> torch.Tensor:
        """Full-sequence eval (hard decisions, spec §3) or vanilla attention."""
        if batch.vanilla:
            q, k_bar = apply_rotary_pos_emb(q, k, cos, sin)
            v_bar = v
            key_bias = torch.zeros_like(alpha)
        else:
            states = pooled_states
            if q.is_cuda and self.runtime.compile_pooling:
                states = _compiled("pooled_states", pooled_states)
            k_raw, v_raw = raw_states(k, v, cos, sin)
            q, k_bar, v_bar = states(q, k, v, alpha, importance, cos, sin, self.dmc.window)
            key_bias = core.key_bias_from_hard(alpha)
        if batch.valid is not None:
            key_bias = key_bias.masked_fill(~batch.valid[:, None, :], float("-inf"))
        if self.dmc.merge_delay and not batch.vanilla:
            return self._attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, batch)
        return self._attend(q, k_bar, v_bar, key_bias, batch)

    def _attend_delayed(self, q, k_bar, v_bar, k_raw, v_raw, key_bias, batch: DMCBatch) -> torch.Tensor:
        """Full-sequence attention with delayed merging (``merge_delay`` w > 0): over the pooled states
        as seen from w tokens back and the raw keys of the last w tokens (:func:`dmc.core.delayed_dense_bias`)."""
        delay = self.dmc.merge_delay
        pad_bias = None
        if batch.valid is not None:
            pad_bias = torch.zeros_like(key_bias).masked_fill(~batch.valid[:, None, :], float("-inf"))
        impl = self.runtime.attn_implementation
        if impl == "auto":
            impl = _auto_attention(q)
        if impl == "flex" and pad_bias is None:
            if batch.block_mask is None:  # one per forward, shared by all layers
                batch.block_mask = delayed_block_mask(batch.document_ids, q.shape[0], q.shape[-2], delay, q.device)
            return flex_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, delay, self.scaling, batch.block_mask)
        bias = core.delayed_dense_bias(key_bias, delay, batch.document_ids, pad_bias)
        keys, values = torch.cat([k_bar, k_raw], dim=-2), torch.cat([v_bar, v_raw], dim=-2)
        if impl == "sdpa":  # inference only: 0/-inf bias as a boolean mask
            groups = q.shape[1] // k_bar.shape[1]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=_expand_kv(bias == 0, groups),
                                                  scale=self.scaling, enable_gqa=groups > 1)
        return biased_attend(q, keys, values, bias, self.scaling)

    def _attend_cached_delayed(self, q, k, v, alpha, importance, cos, sin, layer_cache, batch: DMCBatch):
        """A chunk on top of a cache with delayed merging (``merge_delay`` w > 0).

        The cache keeps the last w token columns raw (:attr:`DMCCacheLayer.pending`: pre-RoPE k with
        channel D-1 zeroed, v, α, ω, validity and RoPE angles). The chunk's tokens join them; the oldest
        leave the window, in order, and go through exactly the DMC path of :meth:`_attend_cached` (they
        merge or append, with their own positions). The chunk's queries then attend over the earlier
        slots, the leaving tokens' states (as §3 sees them from w tokens back) and the raw keys of their
        last w tokens. Columns are relative to the first pending one.
        """
        if not hasattr(layer_cache, "pending"):
            raise ValueError(f"{type(layer_cache).__name__} cannot hold a model with merge_delay > 0: use the "
                             "model's own DMCCache")
        delay = self.dmc.merge_delay
        b, _, n = alpha.shape
        valid = batch.valid if batch.valid is not None else torch.ones(b, n, dtype=torch.bool, device=alpha.device)
        chunk = {"k": k, "v": v, "alpha": alpha, "importance": importance, "valid": valid, "cos": cos, "sin": sin}
        both = chunk if layer_cache.pending is None else {
            name: torch.cat([layer_cache.pending[name], x], dim=PENDING_DIMS[name]) for name, x in chunk.items()}
        total = both["valid"].shape[1]
        first_query = total - n
        leaving = max(0, total - delay)
        cols = torch.arange(total, device=alpha.device)
        q = core.zero_last_channel(_rope_q(q, cos, sin))
        k_raw, v_raw = raw_states(both["k"], both["v"], both["cos"], both["sin"])
        # A padding query still sees its own raw key (no row of the mask is empty: no NaN to spread).
        own = cols[None, :] == cols[first_query:, None]
        raw_mask = core.delayed_raw_visible(cols[first_query:], cols, delay)[None, None] & (
            both["valid"][:, None, None, :] | own)
        keys, values, masks = [k_raw], [v_raw], [raw_mask.expand(b, k.shape[1], n, total)]
        if leaving:
            out = {name: x.narrow(PENDING_DIMS[name], 0, leaving) for name, x in both.items()}
            a_l, valid_l = out["alpha"], out["valid"]
            # The PyTorch pooling: the form the delayed-merging retrofits were measured with (the fused
            # kernel has not been run on this path on a GPU).
            k_bar, v_bar, prefix, terms, sums = self._pool_on_cache(out["k"], out["v"], a_l, out["importance"],
                                                                    out["cos"], out["sin"], layer_cache, q.dtype,
                                                                    fused=False)
            old_k, old_v, old_visible = layer_cache.visible_slots(a_l, valid_l, k_bar)
            new_bias = core.key_bias_from_hard(a_l).masked_fill(~valid_l[:, None, :], float("-inf"))
            pooled = (core.delayed_pooled_bias(cols[first_query:], cols[:leaving], new_bias, delay) == 0) & (
                valid_l[:, None, None, :])
            old_mask = old_visible[..., None, :].expand(*old_visible.shape[:2], n, -1)
            keys, values, masks = [old_k, k_bar] + keys, [old_v, v_bar] + values, [old_mask, pooled] + masks
            layer_cache.commit(a_l, valid_l, k_bar, v_bar, prefix, terms, sums)
        layer_cache.pending = {name: x.narrow(PENDING_DIMS[name], leaving, total - leaving) for name, x in both.items()}
        groups = q.shape[1] // k.shape[1]
        keys, values = _expand_kv(torch.cat(keys, dim=-2), groups), _expand_kv(torch.cat(values, dim=-2), groups)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=_expand_kv(torch.cat(masks, dim=-1), groups),
                                              scale=self.scaling)

    def _attend(self, q, k_bar, v_bar, key_bias, batch: DMCBatch) -> torch.Tensor:
        impl = self.runtime.attn_implementation
        if impl == "auto":
            impl = _auto_attention(q)
        if impl == "dense":
            return dense_attend(q, k_bar, v_bar, key_bias, batch.document_ids, self.scaling)
        if batch.vanilla and batch.valid is None and batch.document_ids is None:
            # Plain causal attention (every key bias is 0): SDPA's flash kernel, faster than FlexAttention's.
            return F.scaled_dot_product_attention(q, k_bar, v_bar, is_causal=True, scale=self.scaling,
                                                  enable_gqa=q.shape[1] != k_bar.shape[1])
        if impl == "sdpa":
            return sdpa_attend(q, k_bar, v_bar, key_bias, batch.document_ids, self.scaling)
        if not self.training and batch.document_ids is None:
            return flex_attend_bucketed(q, k_bar, v_bar, key_bias, self.scaling)
        if batch.block_mask is None:
            batch.block_mask = causal_block_mask(batch.document_ids, q.shape[0], q.shape[-2], q.device)
        return flex_attend(q, k_bar, v_bar, key_bias, batch.document_ids, self.scaling, batch.block_mask)

    def _pool_on_cache(self, k, v, alpha, importance, cos, sin, layer_cache, dtype, fused: bool):
        """A chunk's DMC states on top of a cache's window state (spec §2, §7.4): ``(k̄, v̄, prefix, terms,
        sums)`` with k̄ rotated at each token's position and channel D-1 zeroed; ``terms`` are those of the
        chunk's last W-1 tokens (all the next window state needs) and ``sums`` None on the fused path.
        ``fused``: the Triton pooling (CUDA, bounded window), which never materialises the chunk's terms."""
        window = self.dmc.window
        terms, prefix = _window_terms(k, v, importance, window, layer_cache)
        if fused and window is not None and window > 1:
            from ..kernels.triton_kernels import chunk_states  # here: triton is optional on a CPU
            k_bar, v_bar = chunk_states(k, v, importance, alpha, prefix, cos, sin, window)
            return k_bar, v_bar, prefix, terms, None
        sums = core.pool_with_prefix(alpha, core.weighted_terms(importance, k, v), window, prefix)
        return (*pooled_keys(sums, cos, sin, dtype), prefix, terms, sums)

    def _attend_cached(self, q, k, v, alpha, importance, cos, sin, layer_cache, batch: DMCBatch) -> torch.Tensor:
        if batch.vanilla:
            # α = 0 everywhere: each slot is the token's own key and value, channel D-1 kept.
            terms, prefix = _window_terms(k, v, importance, self.dmc.window, layer_cache)
            q, k_bar = apply_rotary_pos_emb(q, k, cos, sin)
            v_bar, sums = v, terms
        else:
            k_bar, v_bar, prefix, terms, sums = self._pool_on_cache(k, v, alpha, importance, cos, sin, layer_cache,
                                                                    q.dtype, fused=q.is_cuda)
            q = core.zero_last_channel(_rope_q(q, cos, sin))
        valid = batch.valid if batch.valid is not None else torch.ones_like(alpha[:, 0], dtype=torch.bool)
        old_k, old_v, old_visible = layer_cache.visible_slots(alpha, valid, k_bar)
        new_bias = core.key_bias_from_hard(alpha).masked_fill(~valid[:, None, :], float("-inf"))
        if old_k.shape[-2] == 0:  # first chunk: the full-sequence attention (FlexAttention on CUDA)
            out = self._attend(q, k_bar, v_bar, new_bias, batch)
        else:
            out = cached_attend(q, old_k, old_v, old_visible, k_bar, v_bar, new_bias, self.scaling)
        layer_cache.commit(alpha, valid, k_bar, v_bar, prefix, terms, sums)
        layer_cache.after_attention(q, self.scaling, valid)  # cache policies that score slots (eviction)
        return out



# FlexAttention's compiled kernel needs a head dimension of at least 16 (inductor: "NYI: embedding
# dimension ... must be at least 16"); "auto" takes the dense form below that (tiny test models).
FLEX_MIN_HEAD_DIM = 16


def _auto_attention(q: torch.Tensor) -> str:
    return "flex" if q.is_cuda and q.shape[-1] >= FLEX_MIN_HEAD_DIM else "dense"


def _rope_q(q, cos, sin):
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)


def _window_terms(k, v, importance, window: int | None, layer_cache):
    """The weighted terms of a chunk's last W-1 tokens (all the window state after it needs) and the
    cache's window state before it: ``(terms, prefix)``."""
    tail = 1 if window is None else max(1, min(window - 1, k.shape[-2]))
    terms = core.weighted_terms(importance[..., -tail:], k[..., -tail:, :], v[..., -tail:, :])
    return terms, layer_cache.window_prefix(terms)


def raw_states(k, v, cos, sin):
    """The raw (unmerged) keys and values of delayed merging: k with channel D-1 zeroed before and
    after RoPE at its own position (spec §1), v as is."""
    k = core.zero_last_channel(k)
    return core.zero_last_channel(_rope_q(k, cos, sin)), v


def pooled_keys(sums, cos, sin, dtype):
    """Running means (K/Z, V/Z) of pooled sums as the cache stores them: k̄ rotated at its token's
    position, channel D-1 zeroed (what :func:`states_from_sums` returns beside the rotated queries)."""
    k_bar, v_bar = core.normalise(sums, (sums.shape[-1] - 1) // 2)
    return core.zero_last_channel(_rope_q(k_bar.to(dtype), cos, sin)), v_bar.to(dtype)


def pooled_states(q, k, v, alpha, importance, cos, sin, window: int | None):
    """Full-sequence DMC states (spec §3): windowed weighted means of k and v over the open group
    of every token, rotated at the token's position, channel D-1 zeroed. Returns (q, k̄, v̄)."""
    return states_from_sums(q, core.window_pool(alpha, core.weighted_terms(importance, k, v), window), cos, sin)


def states_from_sums(q, sums, cos, sin):
    """Running means (K/Z, V/Z) of pooled sums, k̄ rotated at each token's position (the position
    of the last token merged into its slot), channel D-1 zeroed again after RoPE (spec §1-§2)."""
    k_bar, v_bar = pooled_keys(sums, cos, sin, q.dtype)
    return core.zero_last_channel(_rope_q(q, cos, sin)), k_bar, v_bar


def training_states(q, k, v, noise, starts, valid, cos, sin, init_offset: float, temperature: float,
                    window: int | None, logit_scale: float = 1.0, hard: bool = False):
    """Training-mode DMC (spec §4) up to the attention: relaxed decisions α̃ from channel D-1
    (with logistic noise), soft windowed pooling, the per-key bias log(1 - α̃_{j+1}).

    ``hard=True`` trains with the inference forward instead: the pooling uses the
    straight-through α̂ (hard in value: exactly §3's states) and the bias is §3's 0/-inf mask.

    Returns ``(q, k̄, v̄, α̂, key_bias)`` with α̂ the straight-through hard decisions. Pure
    tensor code, so that on CUDA it compiles into a few fused kernels.
    """
    q, k, logits, importance = core.split_decision_channel(q, k, init_offset, logit_scale)
    relaxed = core.relaxed_logits(logits, temperature, noise)
    forced = core.forced_appends(logits.shape[-1], starts, logits.device).expand_as(logits)
    alpha = torch.sigmoid(relaxed).masked_fill(forced, 0.0)
    if hard:
        alpha = core.straight_through(alpha)
        key_bias = core.key_bias_from_hard(alpha.detach())
    else:
        key_bias = core.key_bias_from_relaxed(relaxed, forced)
    if valid is not None:
        importance = importance * valid[:, None, :]
        alpha = alpha.masked_fill(~valid[:, None, :], 1.0)  # padding is transparent
        key_bias = key_bias.masked_fill(~valid[:, None, :], float("-inf"))
    q, k_bar, v_bar = pooled_states(q, k, v, alpha, importance, cos, sin, window)
    return q, k_bar, v_bar, alpha if hard else core.straight_through(alpha), key_bias


_COMPILED: dict = {}


# Compiles one function may take: FlexAttention compiles once per (length bucket, mask and score form): 128 to
# 8192 tokens make seven buckets, times the causal, document and delayed forms of prefill. Past dynamo's default
# recompile limit (8) the rest would run eagerly, FlexAttention unfused, without an error.
RECOMPILE_LIMIT = 64


def _compiled(name: str, fn, dynamic: bool | None = None):
    """torch.compile ``fn`` once (on CUDA the 12 pooling taps fuse into a few kernels), with room for
    :data:`RECOMPILE_LIMIT` compiles."""
    if name not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[name] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[name]


# ----------------------------------------------------------------------------- attention kernels
def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def biased_attend(q, k, v, bias, scale) -> torch.Tensor:
    """Eager attention with a materialised bias ``[B, H, Lq, Lk]`` (per KV head), softmax in fp32."""
    groups = q.shape[1] // k.shape[1]
    scores = torch.matmul(q.float(), _expand_kv(k, groups).float().transpose(-1, -2)) * scale + _expand_kv(bias, groups)
    return torch.matmul(torch.softmax(scores, dim=-1), _expand_kv(v, groups).float()).to(q.dtype)


def _split_delayed(kv_idx, length: int):
    """Keys of delayed merging are [pooled states (L), raw keys (L)]: (is pooled, token column)."""
    pooled = kv_idx < length
    return pooled, torch.where(pooled, kv_idx, kv_idx - length)


def delayed_block_mask(document_ids, batch: int, length: int, delay: int, device):
    """FlexAttention block mask of delayed merging (the visibility of :func:`dmc.core.delayed_dense_bias`):
    pooled state j iff j <= i - w, raw key j iff i - w < j <= i, within documents when given."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        pooled, j = _split_delayed(kv_idx, length)
        ok = torch.where(pooled, j <= q_idx - delay, (j <= q_idx) & (j > q_idx - delay))
        if document_ids is not None:
            ok = ok & (document_ids[b, q_idx] == document_ids[b, j])
        return ok

    return create_block_mask(mask_mod, batch if document_ids is not None else None, None, length, 2 * length,
                             device=device)


def flex_attend_delayed(q, k_bar, v_bar, k_raw, v_raw, key_bias, delay: int, scale, block_mask) -> torch.Tensor:
    """FlexAttention form of delayed merging: keys [pooled states, raw keys] (2L), the visibility as the
    block mask of :func:`delayed_block_mask`, the training bias log(1 - α̃_{j+1}) of pooled states before
    the open slot as a ``score_mod`` (O(L) extra memory, gradients reaching α through ``key_bias``)."""
    from torch.nn.attention.flex_attention import flex_attention

    groups = q.shape[1] // k_bar.shape[1]
    length = q.shape[-2]

    def score_mod(score, b, h, q_idx, kv_idx):
        pooled, j = _split_delayed(kv_idx, length)
        return score + torch.where(pooled & (j < q_idx - delay), key_bias[b, h // groups, j], 0.0)

    fn = _compiled("flex_attention", flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return fn(q, torch.cat([k_bar, k_raw], dim=-2), torch.cat([v_bar, v_raw], dim=-2), score_mod=score_mod,
              block_mask=block_mask, scale=scale, enable_gqa=groups > 1)


def dense_attend(q, k, v, key_bias, document_ids, scale) -> torch.Tensor:
    """Reference attention with a materialised (B, H, L, L) DMC bias (eager softmax in fp32)."""
    groups = q.shape[1] // k.shape[1]
    bias = _expand_kv(core.dense_bias(key_bias, document_ids), groups)
    scores = torch.matmul(q.float(), _expand_kv(k, groups).float().transpose(-1, -2)) * scale + bias
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, _expand_kv(v, groups).float()).to(q.dtype)


def sdpa_attend(q, k, v, key_bias, document_ids, scale) -> torch.Tensor:
    """SDPA with the hard DMC mask as a boolean ``[B, H*G, L, L]`` tensor (inference: the bias
    must be 0/-inf; no gradient reaches α)."""
    groups = q.shape[1] // k.shape[1]
    i = torch.arange(q.shape[-2], device=q.device)
    allowed = ((i[None, :] < i[:, None]) & (key_bias == 0)[..., None, :]) | (i[None, :] == i[:, None])
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    allowed = _expand_kv(allowed, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=groups > 1)


def causal_block_mask(document_ids: torch.Tensor | None, batch: int, length: int, device):
    """FlexAttention block mask: causal, and within documents when ``document_ids`` is given.
    Built once per forward and shared by all layers (building it costs more than using it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if document_ids is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
        return create_block_mask(mask_mod, None, None, length, length, device=device)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])
    return create_block_mask(doc_mask_mod, batch, None, length, length, device=device)


def flex_attend(q, k, v, key_bias, document_ids, scale, block_mask=None) -> torch.Tensor:
    """FlexAttention with the DMC bias as a ``score_mod`` reading a per-(b, kv head, key) vector:
    O(L) extra memory and gradients reaching α through ``key_bias``."""
    from torch.nn.attention.flex_attention import flex_attention

    groups = q.shape[1] // k.shape[1]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.where(kv_idx < q_idx, key_bias[b, h // groups, kv_idx], 0.0)

    if block_mask is None:
        block_mask = causal_block_mask(document_ids, q.shape[0], q.shape[-2], q.device)
    fn = _compiled("flex_attention", flex_attention, dynamic=False) if q.is_cuda else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=groups > 1)


_BUCKET_MASKS: dict = {}


def flex_attend_bucketed(q, k, v, key_bias, scale) -> torch.Tensor:
    """Inference FlexAttention for any length: q/k/v are right-padded to a power-of-two bucket (at
    least 128), so the compiled kernel and the causal block mask exist once per bucket instead of
    once per prompt length. Exact: under the causal mask no real query sees a padded key."""
    n = q.shape[-2]
    size = max(128, 1 << (n - 1).bit_length())
    if size != n:
        pad = (0, 0, 0, size - n)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        key_bias = F.pad(key_bias, (0, size - n), value=float("-inf"))
    key = (size, q.device)
    if key not in _BUCKET_MASKS:
        _BUCKET_MASKS[key] = causal_block_mask(None, 1, size, q.device)
    return flex_attend(q, k, v, key_bias, None, scale, _BUCKET_MASKS[key])[..., :n, :]


def cached_attend(q, old_k, old_v, old_visible, new_k, new_v, new_bias, scale) -> torch.Tensor:
    """Attention of a chunk's queries over the cached slots and the chunk's own states.

    Args:
        q: ``[B, H*G, n, D]`` rotated queries.
        old_k, old_v: cached slots ``[B, H, S, D]``; ``old_visible`` ``[B, H, S]`` bool.
        new_k, new_v: the chunk's pooled, rotated states ``[B, H, n, D]``.
        new_bias: ``[B, H, n]`` 0/-inf visibility of chunk key j to later chunk queries (§3).
    """
    n = q.shape[-2]
    groups = q.shape[1] // new_k.shape[1]
    i = torch.arange(n, device=q.device)
    within = torch.where(i[None, :] < i[:, None], new_bias[..., None, :] == 0, i[None, :] == i[:, None])
    mask = torch.cat([old_visible[..., None, :].expand(*old_visible.shape[:2], n, -1), within], dim=-1)
    keys = _expand_kv(torch.cat([old_k, new_k], dim=-2), groups)
    values = _expand_kv(torch.cat([old_v, new_v], dim=-2), groups)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=_expand_kv(mask, groups), scale=scale)
