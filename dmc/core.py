"""The DMC mechanism as pure tensor functions (spec §1-§4).

Everything that decides, pools, masks or scores DMC lives here and nowhere else: the HF model,
the trainer, the cache, the engine's PyTorch twins and the tests all call these functions.

Shapes use B = batch, H = KV heads, G = query heads per KV head, L = tokens, D = head dim.
Decisions, importances and masks are per KV head: ``[B, H, L]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPORTANCE_FLOOR = 2.0**-7  # spec §1: ω = sigmoid(.) + 2^-7 keeps every group's weight positive


# --------------------------------------------------------------------------- §1 channels
def split_decision_channel(
    q: torch.Tensor, k: torch.Tensor, init_offset: float, logit_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the decision logit and importance from channel D-1, then zero that channel.

    Args:
        q: queries before RoPE, ``[B, H*G, L, D]``.
        k: keys before RoPE, ``[B, H, L, D]``.
        init_offset: the offset c (5.0 in the paper).
        logit_scale: s in ``a = s·k[D-1] - c`` (1 in the paper; a training reparametrisation,
            folded into the weights before a model is saved).

    Returns:
        ``(q, k, logits, importance)``: q and k with channel D-1 set to 0, decision logits
        ``a = s·k[D-1] - c`` and importances ``ω = sigmoid(mean_g q[D-1] + c) + 2^-7``, both
        ``[B, H, L]`` in fp32.
    """
    b, hq, length, _ = q.shape
    h = k.shape[1]
    logits = k[..., -1].float()
    if logit_scale != 1.0:
        logits = logits * logit_scale
    logits = logits - init_offset
    q_last = q[..., -1].float().view(b, h, hq // h, length).mean(dim=2)
    importance = torch.sigmoid(q_last + init_offset) + IMPORTANCE_FLOOR
    return zero_last_channel(q), zero_last_channel(k), logits, importance


_CHANNEL_FACTORS: dict = {}


def _last_channel_factor(x: torch.Tensor, value: float) -> torch.Tensor:
    """``[1, ..., 1, value]`` over x's last dim, in x's dtype. Built on the device (``keep[-1] = 0`` would copy a
    host scalar in, which makes the host wait for the GPU: once per layer in prefill), and kept: inference calls
    this several times a layer, and each build is four launches of the host's. (Not kept while compiling.)"""
    if torch.compiler.is_compiling():
        channel = torch.arange(x.shape[-1], device=x.device)
        return torch.where(channel == x.shape[-1] - 1, value, 1.0).to(x.dtype)
    key = (x.shape[-1], x.dtype, x.device, value)
    factor = _CHANNEL_FACTORS.get(key)
    if factor is None:
        channel = torch.arange(x.shape[-1], device=x.device)
        with torch.inference_mode(False):  # usable by autograd and inference alike
            factor = _CHANNEL_FACTORS[key] = torch.where(channel == x.shape[-1] - 1, value, 1.0).to(x.dtype)
    return factor


def zero_last_channel(x: torch.Tensor) -> torch.Tensor:
    """Return x with channel D-1 set to 0 (out of place, autograd-safe)."""
    return x * _last_channel_factor(x, 0.0)


def scale_last_channel(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply channel D-1 by ``scale`` (the zero-out stage's μ(s), spec §5.1)."""
    if scale == 1.0:
        return x
    return x * _last_channel_factor(x, scale)


# --------------------------------------------------------------------------- §2/§4 decisions
def forced_appends(length: int, starts: torch.Tensor | None, device=None) -> torch.Tensor:
    """Bool ``[B or 1, 1, L]``: where α is forced to 0.

    ``starts`` ([B, L] bool) marks sequence and document starts; without it, position 0 of
    the tensor is the sequence start. (A chunk decoded on top of a cache passes ``starts``:
    its position 0 usually continues the sequence.)
    """
    if starts is not None:
        return starts[:, None, :].to(device)
    forced = torch.zeros(1, 1, length, dtype=torch.bool, device=device)
    forced[..., 0] = True
    return forced


def force_append(alpha: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """Set α = 0 where a sequence or document starts (see :func:`forced_appends`)."""
    return alpha.masked_fill(forced_appends(alpha.shape[-1], starts, alpha.device), 0.0)


def hard_decisions(logits: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """α_t = 1[a_t > 0], forced to 0 at starts (spec §2). fp32 0/1, ``[B, H, L]``."""
    return force_append((logits > 0).float(), starts)


def periodic_decisions(positions: torch.Tensor, period: int, heads: int,
                       starts: torch.Tensor | None = None) -> torch.Tensor:
    """α_t = 1[t % period != 0] for every head: a benchmark driver that makes a random-weight
    model compress at exactly CR = period (never used by a trained model). ``positions``
    ``[B, n]`` → ``[B, heads, n]`` fp32, forced to 0 at starts."""
    alpha = (positions % period != 0).float()[:, None, :].expand(-1, heads, -1)
    return force_append(alpha, starts)


def inference_decisions(logits: torch.Tensor, starts: torch.Tensor | None = None,
                        positions: torch.Tensor | None = None, forced_period: int = 0) -> torch.Tensor:
    """The hard α of inference (spec §2): ``1[a > 0]`` forced to 0 at starts, or, with
    ``forced_period > 0`` and ``positions`` ``[B, n]``, the benchmark driver
    :func:`periodic_decisions`. ``logits`` ``[B, H, n]`` → fp32 ``[B, H, n]``."""
    if forced_period > 0 and positions is not None:
        return periodic_decisions(positions, forced_period, logits.shape[1], starts)
    return hard_decisions(logits, starts)


def logistic_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """G1 - G2 for G1, G2 ~ Gumbel(0, 1), i.e. standard logistic noise, in fp32."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def relaxed_logits(logits: torch.Tensor, temperature: float, noise: torch.Tensor | None) -> torch.Tensor:
    """x = (a + G1 - G2) / τ, so that α̃ = sigmoid(x) (spec §4)."""
    if noise is not None:
        logits = logits + noise
    return logits / temperature


def straight_through(alpha_soft: torch.Tensor) -> torch.Tensor:
    """α̂ = 1[α̃ > 0.5] - sg(α̃) + α̃: hard in value, soft in gradient (spec §4)."""
    hard = (alpha_soft > 0.5).to(alpha_soft.dtype)
    return hard - alpha_soft.detach() + alpha_soft


# --------------------------------------------------------------------------- §2/§3 pooling
def weighted_terms(importance: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stack the weighted terms [ω k, ω v, ω] in fp32: ``[B, H, L, 2D + 1]``."""
    w = importance.unsqueeze(-1)
    return torch.cat([w * k.float(), w * v.float(), w], dim=-1)


def _shift(x: torch.Tensor, steps: int, dim: int) -> torch.Tensor:
    """x shifted ``steps`` positions later along ``dim``, zero-filled: out[t] = x[t - steps]."""
    if steps == 0:
        return x
    n = x.shape[dim]
    steps = min(steps, n)
    pad_shape = list(x.shape)
    pad_shape[dim] = steps
    head = x.narrow(dim, 0, n - steps)
    return torch.cat([x.new_zeros(pad_shape), head], dim=dim)


def window_pool(alpha: torch.Tensor, terms: torch.Tensor, window: int | None) -> torch.Tensor:
    """Closed-form windowed pooling (spec §3): S_t = Σ_j c_{j→t} terms_j.

    ``c_{j→t} = Π_{m=j+1..t} α_m`` restricted to ``j ≥ t - W + 1`` (all j ≤ t when window is
    None). Works for soft and hard α.

    Args:
        alpha: decisions ``[..., L]`` in [0, 1].
        terms: weighted terms ``[..., L, C]`` (see :func:`weighted_terms`).
        window: W, or None for unbounded groups.

    Returns:
        Unnormalised sums ``[..., L, C]``.
    """
    length = alpha.shape[-1]
    # Taps even when W >= L: prefill and step-by-step decoding then add the same terms in
    # the same order, so their slots agree bit for bit.
    if window is None:
        return _prefix_scan(alpha, terms)
    window = min(window, length)
    # W taps: S_t = Σ_{d<W} (Π_{m=t-d+1..t} α_m) terms_{t-d}.
    out = terms
    carry = torch.ones_like(alpha)
    for d in range(1, window):
        carry = carry * _shift(alpha, d - 1, dim=-1)
        out = out + carry.unsqueeze(-1) * _shift(terms, d, dim=-2)
    return out


def _prefix_scan(alpha: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """Unbounded pooling S_t = α_t S_{t-1} + terms_t as a log-depth associative scan."""
    a, s = alpha, terms
    step = 1
    while step < alpha.shape[-1]:
        s = s + a.unsqueeze(-1) * _shift(s, step, dim=-2)
        a = a * _shift(a, step, dim=-1)
        step *= 2
    return s


def window_pool_recursive(alpha: torch.Tensor, terms: torch.Tensor, window: int | None) -> torch.Tensor:
    """Step-by-step twin of :func:`window_pool` (spec §2, §7.2).

    Keeps a ring of the last W entries ``c_{j→t} terms_j`` of the open group: each step scales
    the ring by α_t, drops the oldest entry once W are held, and pushes terms_t.
    """
    ring: list[torch.Tensor] = []
    outs = []
    for t in range(alpha.shape[-1]):
        a_t = alpha[..., t].unsqueeze(-1)
        ring = [entry * a_t for entry in ring]
        if window is not None and len(ring) == window:
            ring.pop(0)
        ring.append(terms[..., t, :])
        outs.append(torch.stack(ring).sum(0))
    return torch.stack(outs, dim=-2)


def next_window_state(alpha: torch.Tensor, terms: torch.Tensor, window: int | None,
                      prefix: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Window state after a chunk (what decoding carries from one step to the next).

    Windowed: the last W-1 terms of (prefix, chunk), each scaled by ``c_{j→T}`` (1 if token j
    is in the group open at the chunk's last token T, else 0 for hard α), ``[..., W-1, C]``.
    Unbounded: the group's sums at T, ``[..., 1, C]``. ``prefix`` is the state before the
    chunk (α = 1 inside it), ``sums`` the chunk's pooled sums.
    """
    if window is None:
        return sums[..., -1:, :]
    width = window - 1
    if width == 0:
        return terms[..., :0, :]
    alpha_all = torch.cat([alpha.new_ones(*alpha.shape[:-1], prefix.shape[-2]), alpha], dim=-1)
    tail_alpha = alpha_all[..., -width:]
    tail_terms = torch.cat([prefix, terms], dim=-2)[..., -width:, :]
    link = torch.cat([tail_alpha[..., 1:], tail_alpha.new_ones(*tail_alpha.shape[:-1], 1)], dim=-1)
    membership = link.flip(-1).cumprod(-1).flip(-1)  # Π_{m=j+1..T} α_m
    return tail_terms * membership.unsqueeze(-1)


def pool_with_prefix(alpha: torch.Tensor, terms: torch.Tensor, window: int | None,
                     prefix: torch.Tensor | None) -> torch.Tensor:
    """Pool a chunk given the cached window state ``prefix`` (``[B, H, P, C]``, α = 1 inside it:
    the open group's last terms, already scaled to the group). Returns the chunk's sums."""
    if prefix is None or prefix.shape[-2] == 0:
        return window_pool(alpha, terms, window)
    p = prefix.shape[-2]
    alpha_all = torch.cat([alpha.new_ones(*alpha.shape[:-1], p), alpha], dim=-1)
    return window_pool(alpha_all, torch.cat([prefix, terms], dim=-2), window)[..., p:, :]


def normalise(sums: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split pooled sums [K, V, Z] into the running means (K/Z, V/Z).

    Z > 0 for every real token (ω ≥ 2^-7); padding tokens carry Z = 0 and come out as 0.
    """
    k_sum, v_sum, z = sums[..., :head_dim], sums[..., head_dim:2 * head_dim], sums[..., -1:]
    z = z.clamp_min(1e-30)
    return k_sum / z, v_sum / z


# --------------------------------------------------------------------------- §2/§3 slots
# The slot rules of hard decisions, used by both caches, the engine's twins and the §3 mask. (The
# Triton kernels restate them in their own language; the tests compare them with these.)
def merges(alpha: torch.Tensor) -> torch.Tensor:
    """Bool: the token merges into the slot before it (α > 0.5)."""
    return alpha > 0.5


def ends_slot(alpha: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., n]``: token j ends a slot (its state is kept) unless token j+1 merges into it.

    The chunk's last token always ends one (it is the open slot until a later token merges)."""
    nxt = torch.cat([alpha[..., 1:], torch.zeros_like(alpha[..., :1])], dim=-1)
    return ~merges(nxt)


def merges_into_last(first_alpha: torch.Tensor, lengths: torch.Tensor,
                     first_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, H]``: a chunk's first token merges into the last cached slot, which it then
    overwrites (its partial state is superseded). ``first_alpha`` ``[B, H]``; ``lengths`` ``[B, H]``
    slots held before the chunk (an empty head has no slot to merge into); ``first_valid`` ``[B]``
    False where the first token is padding."""
    merge = merges(first_alpha) & (lengths > 0)
    if first_valid is not None:
        merge = merge & first_valid[:, None]
    return merge


def slot_writes(alpha: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor | None = None):
    """Where a chunk's tokens land among a head's slots (spec §2: append = new slot, merge =
    overwrite the last).

    Args:
        alpha: hard decisions ``[B, H, n]`` (padding: 1).
        lengths: slots held before the chunk ``[B, H]``.
        valid: ``[B, n]`` bool, False for padding tokens, or None.

    Returns:
        ``(base, kept, slot, new_lengths)``: ``base`` ``[B, H]`` the first slot the chunk writes,
        ``kept`` ``[B, H, n]`` the tokens whose state is kept (:func:`ends_slot`, real tokens only),
        ``slot`` ``[B, H, n]`` the slot a kept token is written to (meaningless where not kept) and
        ``new_lengths`` ``[B, H]``.
    """
    first_valid = None if valid is None else valid[:, 0]
    base = lengths - merges_into_last(alpha[..., 0], lengths, first_valid).long()
    kept = ends_slot(alpha)
    if valid is not None:
        kept = kept & valid[:, None, :]
    slot = base[..., None] + kept.long().cumsum(-1) - 1
    return base, kept, slot, base + kept.sum(-1)


def slot_ends(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token, the first kept token at or after it (the one that ends its slot): ``(index, found)``,
    both ``[..., n]``; where none follows (trailing padding), index n - 1 and found False. Lets a cache write
    every token's slot with its group's final state (identical writes, no pile-up on one dummy address)."""
    n = kept.shape[-1]
    tokens = torch.arange(n, device=kept.device).expand_as(kept)
    candidates = torch.where(kept, tokens, n)
    end = candidates.flip(-1).cummin(-1).values.flip(-1)
    return end.clamp_max(n - 1), end < n


# --------------------------------------------------------------------------- §3/§4 attention
def key_bias_from_hard(alpha: torch.Tensor) -> torch.Tensor:
    """Per-key bias for hard α (spec §3): 0 if key j ends a slot (:func:`ends_slot`), else -inf.

    The last key's bias is 0 (it is the open slot). Applied to j < i only; j == i is always
    visible. ``[B, H, L]`` fp32.
    """
    return torch.where(ends_slot(alpha), 0.0, float("-inf")).to(torch.float32)


def key_bias_from_relaxed(relaxed: torch.Tensor, starts_forced: torch.Tensor) -> torch.Tensor:
    """Per-key training bias b_j = log(1 - α̃_{j+1}) = logsigmoid(-x_{j+1}) (spec §4).

    Args:
        relaxed: x = (a + noise) / τ, ``[B, H, L]`` (α̃ = sigmoid(x)).
        starts_forced: bool ``[B, H, L]``, True where α̃ is forced to 0 (its bias term is 0).
    """
    log_keep = F.logsigmoid(-relaxed).masked_fill(starts_forced, 0.0)
    return torch.cat([log_keep[..., 1:], torch.zeros_like(log_keep[..., :1])], dim=-1)


def dense_bias(key_bias: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Materialise the (B, H, L, L) attention bias: key_bias[j] for j < i, 0 for j == i,
    -inf for j > i or across documents. The O(L²) reference form."""
    length = key_bias.shape[-1]
    i = torch.arange(length, device=key_bias.device)
    below = (i[None, :] < i[:, None])  # [Lq, Lk], j < i
    diag = i[None, :] == i[:, None]
    bias = torch.where(below, key_bias[..., None, :], 0.0)
    allowed = below | diag
    if doc_ids is not None:
        same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        allowed = allowed & same_doc
    return bias.masked_fill(~allowed, float("-inf"))


# --------------------------------------------------------------------------- delayed merging (option)
# ``merge_delay`` w > 0 (DMCConfig): query i sees the raw keys of its last w tokens (i-w, i] and the DMC
# states of the tokens older than that, as §3 sees them from position i-w: the state at i-w (its
# open slot) and every earlier state that ends a slot. w = 0 is §3 exactly (no raw keys).
def delayed_pooled_bias(query_cols: torch.Tensor, key_cols: torch.Tensor, key_bias: torch.Tensor,
                        delay: int) -> torch.Tensor:
    """Bias ``[B, H, n, m]`` of queries (columns ``query_cols`` ``[n]``) on pooled states (columns
    ``key_cols`` ``[m]``, per-key bias ``key_bias`` ``[B, H, m]``: training's log(1 - α̃_{j+1}) or
    §3's 0/-inf): 0 at the open slot (key column = query column - w), ``key_bias`` before it,
    -inf after it. With w = 0 and the same columns this is :func:`dense_bias`."""
    horizon = query_cols[:, None] - delay
    below = key_cols[None, :] < horizon
    allowed = below | (key_cols[None, :] == horizon)
    bias = torch.where(below, key_bias[..., None, :], 0.0)
    return bias.masked_fill(~allowed, float("-inf"))


def delayed_raw_visible(query_cols: torch.Tensor, key_cols: torch.Tensor, delay: int) -> torch.Tensor:
    """Bool ``[n, r]``: query column i sees the raw key of column j iff i - w < j <= i."""
    rel = query_cols[:, None] - key_cols[None, :]
    return (rel >= 0) & (rel < delay)


def delayed_dense_bias(key_bias: torch.Tensor, delay: int, doc_ids: torch.Tensor | None = None,
                       pad_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, H, L, 2L) bias of a full sequence with delayed merging, keys ordered [pooled states,
    raw keys]; ``pad_bias`` ``[B, H, L]`` (0/-inf: padding) is added to both. The O(L²) reference form."""
    length = key_bias.shape[-1]
    cols = torch.arange(length, device=key_bias.device)
    pooled = delayed_pooled_bias(cols, cols, key_bias, delay)
    raw = torch.where(delayed_raw_visible(cols, cols, delay), 0.0, float("-inf")).to(pooled.dtype)
    raw = raw.expand_as(pooled)
    if pad_bias is not None:  # padding keys hidden, a raw one except from itself (no empty row: no NaN)
        pooled = pooled + pad_bias[..., None, :]
        raw = torch.where(cols[:, None] == cols[None, :], raw, raw + pad_bias[..., None, :])
    bias = torch.cat([pooled, raw], dim=-1)
    if doc_ids is not None:
        same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        bias = bias.masked_fill(~torch.cat([same_doc, same_doc], dim=-1), float("-inf"))
    return bias


def delayed_merge_rate(target_cr: float | torch.Tensor, length: int, delay: int) -> float | torch.Tensor:
    """The merge rate that gives ``target_cr`` over a sequence of ``length`` tokens when its last
    ``delay`` tokens are kept raw: slots = w + (L - w)(1 - rate) = L / CR. ``1 - 1/CR`` at w = 0.
    A sequence too short for the target (L / CR <= w) gets rate 1: merge all that can merge (the
    trainer refuses such settings up front; this keeps a short evaluation window from failing)."""
    if delay == 0:
        return 1.0 - 1.0 / target_cr
    if delay >= length:
        return 1.0
    rate = 1.0 - (length / target_cr - delay) / (length - delay)
    return rate.clamp(max=1.0) if isinstance(rate, torch.Tensor) else min(1.0, rate)


def delayed_cr(mean_alpha: float | torch.Tensor, length: int, delay: int) -> float | torch.Tensor:
    """CR of a ``length``-token sequence whose tokens merge at rate ``mean_alpha``, the last ``delay``
    kept raw: ``L / (w + (L - w)(1 - rate))`` (:func:`cr_from_alpha` at w = 0)."""
    if delay == 0:
        return cr_from_alpha(mean_alpha)
    w = min(delay, length)
    return length / (w + (length - w) * (1 - mean_alpha))


# --------------------------------------------------------------------------- §4/§5 loss, schedules
def compression_loss(alpha_hat: torch.Tensor, target_cr: float | torch.Tensor,
                     valid: torch.Tensor | None = None, two_sided: bool = False,
                     merge_delay: int = 0) -> torch.Tensor:
    """One-sided compression loss (spec §4).

    Args:
        alpha_hat: straight-through decisions ``[B, layers, H, L]``.
        target_cr: CR(s) of the schedule.
        valid: optional ``[B, L]`` bool of real (non-padding) tokens.
        two_sided: penalise compressing more than the target too (``|(1 - 1/CR) - mean α̂|``): at a
            fixed target a one-sided loss lets the merge rate overshoot; not in the paper.
        merge_delay: w of delayed merging: the target rate is the one that gives CR over the row's
            length with its last w tokens raw (:func:`delayed_merge_rate`).

    Returns:
        Scalar: mean over the batch of ``max(0, (1 - 1/CR) - mean_{layers,heads,t} α̂)``.
    """
    if valid is None:
        mean_alpha = alpha_hat.mean(dim=(1, 2, 3))
    else:
        w = valid[:, None, None, :].to(alpha_hat.dtype)
        mean_alpha = (alpha_hat * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * alpha_hat.shape[1]
                                                            * alpha_hat.shape[2]).clamp_min(1)
    target_rate = delayed_merge_rate(torch.as_tensor(target_cr, dtype=alpha_hat.dtype, device=alpha_hat.device),
                                     alpha_hat.shape[-1], merge_delay)
    if two_sided:
        return (target_rate - mean_alpha).abs().mean()
    return F.relu(target_rate - mean_alpha).mean()


def head_ceiling_loss(alpha_hat: torch.Tensor, max_head_cr: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Optional per-head cap on compression: mean over (layer, head) of
    ``max(0, mean_{b,t} α̂ - (1 - 1/max_head_cr))``.

    The sequence-level loss of §4 can be met by a few heads that merge everything (CR ≈ the
    sequence length) while others keep every token; this penalises any (layer, head) whose
    merge rate exceeds that of ``max_head_cr``. ``alpha_hat`` ``[B, layers, H, L]``.
    """
    if valid is None:
        rate = alpha_hat.mean(dim=(0, 3))
    else:
        w = valid[:, None, None, :].to(alpha_hat.dtype)
        rate = (alpha_hat * w).sum(dim=(0, 3)) / w.sum(dim=(0, 3)).clamp_min(1)
    return F.relu(rate - (1.0 - 1.0 / max_head_cr)).mean()


def cr_multiplier_update(log_multiplier: float, target_cr: float, achieved_cr: float, rate: float,
                         max_log: float) -> float:
    """One dual-ascent step on the compression constraint ``achieved CR ≥ target CR``.

    The loss weight is ``base · exp(log_multiplier)``; the log grows in proportion to the relative
    shortfall ``(target - achieved) / target`` and shrinks when compression runs ahead, clipped to
    ``[0, max_log]`` (so the weight never drops below the base weight of §4). Multiplicative,
    because the weight that lets the compression gradient outvote the LM gradient on the decision
    rows differs by orders of magnitude between models.
    """
    shortfall = (target_cr - achieved_cr) / target_cr
    return min(max_log, max(0.0, log_multiplier + rate * shortfall))


def linear_anneal(step: int, steps: int, start: float, end: float) -> float:
    """``start`` at step 0 of a stage, ``end`` at its last step, linear in between."""
    if steps <= 1:
        return end
    return start + (end - start) * min(1.0, step / (steps - 1))


def cr_schedule(step: int, target_cr: float, ramp_steps: int) -> float:
    """CR(s) = 1 + (CR* - 1) · min(1, s / S): a linear ramp of CR (spec §5.2)."""
    if target_cr < 1:
        raise ValueError(f"target CR must be >= 1, got {target_cr}")
    progress = 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)
    return 1.0 + (target_cr - 1.0) * progress


def zero_out_scale(step: int, steps: int) -> float:
    """μ(s) = max(0, 1 - s / (0.8 S)): the zero-out stage's multiplier (spec §5.1)."""
    if steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / (0.8 * steps))


def cr_from_alpha(mean_alpha: float | torch.Tensor) -> float | torch.Tensor:
    """Compression ratio 1 / (1 - mean α) (tokens per kept slot)."""
    if isinstance(mean_alpha, torch.Tensor):
        return 1.0 / (1.0 - mean_alpha).clamp_min(1e-12)
    return 1.0 / max(1e-12, 1.0 - mean_alpha)

