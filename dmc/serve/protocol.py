"""The OpenAI request bodies the server accepts (pydantic), and the error object it returns.

Fields the engine cannot honour (penalties, logit_bias, suffix, tools, best_of > n) are accepted by
the schema so that a client gets a clear 400 naming them, not a silent default.
Unknown fields are ignored (clients send newer parameters). Extensions beyond OpenAI's API, as
in vLLM: ``top_k``, ``stop_token_ids``, ``ignore_eos``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64 = dict(ge=-(2**63), le=2**63 - 1)
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
StopString = Annotated[str, Field(min_length=1)]
Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {message, type, param, code}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    top_p: Probability | None = None
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="extension: -1 or 0 = no limit")
    seed: int | None = Field(None, **INT64)
    stop: StopString | list[StopString] | None = Field(None, max_length=16)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="extension")
    ignore_eos: bool = Field(False, description="extension: keep generating past the end-of-sequence token")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not supported by the engine: accepted here so the 400 can name them.
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="text, token ids, or a batch of either")
    max_tokens: int | None = Field(16, ge=0, le=2**31 - 1, description="0: with echo, score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """Image, audio and file parts: refused with a 400 (the engine reads text)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file", "refusal"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = Field(True, description="extension: end the prompt with the assistant's turn")


def unsupported(request: CompletionRequest | ChatCompletionRequest) -> APIError | None:
    """A 400 naming the first field the engine cannot honour, or None."""
    checks = [
        ("presence_penalty", bool(request.presence_penalty), "penalties are not supported by the dmc engine"),
        ("frequency_penalty", bool(request.frequency_penalty), "penalties are not supported by the dmc engine"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported by the dmc engine"),
    ]
    if isinstance(request, CompletionRequest):
        checks += [
            ("max_tokens", request.max_tokens == 0 and not request.echo,
             "max_tokens 0 generates nothing: send it with echo (and logprobs) to score the prompt"),
            ("suffix", request.suffix is not None, "suffix (insertion) is not supported by the dmc engine"),
            ("best_of", request.best_of not in (None, request.n),
             "best_of other than n is not supported (the server does not rank choices); use n"),
        ]
    else:
        checks += [
            ("top_logprobs", request.top_logprobs is not None and not request.logprobs,
             "top_logprobs needs logprobs: true"),
            ("tools", bool(request.tools), "tools (function calling) are not supported by the dmc server"),
            ("response_format", bool(request.response_format) and request.response_format.get("type") != "text",
             "response_format other than text is not supported by the dmc server"),
        ]
    for param, bad, message in checks:
        if bad:
            return APIError(400, message, param=param, code="unsupported_parameter")
    return None
