"""What a request asks for (SamplingParams) and what it gets back (RequestOutput)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request (the vLLM conventions).

    Attributes:
        max_tokens: most new tokens to generate; 0 prefills the prompt and generates nothing (scoring it:
            only with ``prompt_logprobs``).
        temperature: 0 = greedy; otherwise softmax temperature.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches p (1 = all).
        seed: makes a sampled request reproducible whatever else runs in the batch
            (None: drawn from the engine's seed).
        stop_token_ids: tokens that end the request (kept in the output).
        stop: strings that end the request (the text is cut before them).
        ignore_eos: keep going past the tokenizer's end-of-sequence token.
        logprobs: return each generated token's log-prob and the ``logprobs`` most likely tokens at its
            position (0: the chosen token's only; None: none). They are the model's distribution, before
            temperature, top-k and top-p (:mod:`dmc.engine.logprobs`).
        prompt_logprobs: the same for every prompt token (the first has none: nothing predicts it), computed
            from the prefill's logits of every prompt token (None: not computed, the prefill keeps only the
            last token's logits).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the accepted range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 1 (0 only to score a prompt), got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens=0 generates nothing: it only scores the prompt, so set prompt_logprobs "
                             "(0 or more)")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
                raise ValueError(f"{name} must be an integer >= 0 (the most likely tokens to return beside the "
                                 f"chosen one) or None, got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(slots=True)
class TokenLogprob:
    """One position's log-probs: the token there and the most likely ones (the model's distribution).

    Attributes:
        token_id: the token at this position (sampled, or the prompt's).
        logprob: its log-prob.
        top: the k most likely ``(token id, log-prob)``, most likely first (k = ``logprobs`` or
            ``prompt_logprobs``; the chosen token may be among them or not).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """The result of one request (or, when streaming, its state so far).

    Attributes:
        request_id: index of the prompt in the call (or the id given to ``add_request``).
        prompt: the prompt as given.
        prompt_token_ids: the tokens the model saw.
        text: generated text (empty without a tokenizer).
        token_ids: generated tokens.
        finished: True once the request ended.
        finish_reason: "stop" (a stop token/string or EOS), "length" (max_tokens or the
            model's context), "error", "aborted", or None while running.
        error: why the request was refused, when finish_reason == "error".
        compression: realized compression of this request's cache when it finished:
            tokens, slots, overall CR, CR per layer ``[L]`` (see :class:`dmc.CompressionStats`).
        num_preemptions: times the request lost its cache to memory pressure and was recomputed.
        logprobs: one :class:`TokenLogprob` per generated token, when ``SamplingParams.logprobs`` is set.
        prompt_logprobs: one per prompt token (None for the first), when ``SamplingParams.prompt_logprobs`` is
            set (filled once the prompt is prefilled).
        new_token_ids, new_text, new_logprobs: what this update added (streaming).
    """

    request_id: int
    prompt: str | list[int]
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    compression: dict | None = None
    num_preemptions: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] | None = None
