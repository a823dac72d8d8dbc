"""The OpenAI request bodies the server accepts, their validation, and OpenAI-shaped errors.

Every body is checked strictly: an unknown field, a wrong type, an out-of-range value or an
OpenAI parameter this server does not implement is a 400 that names the parameter. vLLM
instead ignores unknown fields with a warning; here a client never gets an answer computed
without a setting it asked for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..batching.params import SamplingParams

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "parse_request",
]

# OpenAI's error "type" for each status this server returns.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}

# OpenAI parameters that exist but are not implemented here: named as such in the 400 message
# rather than as unknown fields.
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "audio": "audio output", "modalities": "non-text output", "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models", "web_search_options": "web search",
    "service_tier": "service tiers", "store": "stored completions", "metadata": "metadata",
    "verbosity": "verbosity control", "moderation": "moderation",
    "prompt_cache_key": "cache routing keys", "prompt_cache_retention": "cache retention",
    "prompt_cache_options": "cache options", "safety_identifier": "safety identifiers",
}  # fmt: skip

MAX_LOGPROBS = 20  # the engine's limit on top-k log-probabilities
MAX_STOP = 16


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    # strict: no "5" -> 5 or true -> 1 coercions; JSON numbers still fill float fields.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type")
            if kind != "text" or set(part) != {"type", "text"} or not isinstance(
                part.get("text"), str
            ):
                raise ValueError(
                    f"content part {i} must be {{'type': 'text', 'text': str}} (this server "
                    f"serves text-only models); got type {kind!r}"
                )
            texts.append(part["text"])
        return "".join(texts)


class _Common(_Strict):
    """Fields shared by chat and text completions (OpenAI's names, then vLLM extensions)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for abuse tracking: it never changes the output
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP} "
                             "non-empty strings")
        return v

    def check_supported(self) -> None:
        """400 for accepted-but-default-only OpenAI parameters set to anything else."""
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n} is not supported: one choice per request (n=1)",
                           param="n", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0):
                raise APIError(400, f"{name}={v} is not supported (the engine has no "
                               "penalties); leave it at 0", param=name, code="unsupported_value")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported; leave it empty",
                           param="logit_bias", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise APIError(400, "stop_token_ids must be token ids >= 0", param="stop_token_ids")

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={self.min_tokens} exceeds max_tokens={max_tokens}",
                           param="min_tokens")
        stop = self.stop if self.stop is not None else ()
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=0 if self.top_k in (None, -1) else self.top_k,  # -1: vLLM's "no top-k"
            seed=self.seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format not in (None, {"type": "text"}):
            raise APIError(400, "response_format: only {'type': 'text'} is supported (no JSON "
                           "mode or schemas)", param="response_format",
                           code="unsupported_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise APIError(400, "max_tokens and max_completion_tokens disagree; set one",
                           param="max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo=true is not supported", param="echo",
                           code="unsupported_value")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix",
                           code="unsupported_value")
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of={self.best_of} is not supported (best_of=1 only)",
                           param="best_of", code="unsupported_value")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or token ids (a batch of one is unwrapped)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt holds {len(p)} prompts; send one prompt per "
                               "request", param="prompt", code="unsupported_value")
            p = p[0]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        return p

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs


# Messages for fields whose union types make pydantic's own errors hard to read.
_EXPECTED = {
    "stop": "a string or a list of strings",
    "prompt": "a string, a list of token ids, or a list holding one of those",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}


def _param_of(loc: tuple[Any, ...], body: Any) -> tuple[str, str]:
    """``(dotted param path, last field name)``, following ``loc`` only through what is
    actually in the body (pydantic adds union-member tags such as ``'list[str]'``)."""
    parts: list[str] = []
    field = ""
    cur = body
    for key in loc:
        if isinstance(cur, dict) and isinstance(key, str) and key in cur:
            parts.append(key)
            field, cur = key, cur[key]
        elif isinstance(cur, list) and isinstance(key, int) and 0 <= key < len(cur):
            parts.append(f"[{key}]")
            cur = cur[key]
        elif isinstance(cur, dict) and isinstance(key, str):
            parts.append(key)  # a missing field
            field = key
            break
        else:
            break
    return ".".join(parts).replace(".[", "["), field


def parse_request(model: type[_Common], body: dict[str, Any]) -> Any:
    """Validate ``body`` as ``model``; the first problem becomes a 400 naming its parameter."""
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        # An unknown field is the likelier root cause of anything else that failed.
        errors = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        err = errors[0]
        param, field = _param_of(tuple(err["loc"]), body)
        kind = err["type"]
        if kind == "extra_forbidden":
            if field in UNSUPPORTED:
                msg = f"{param!r} ({UNSUPPORTED[field]}) is not supported by this server"
                raise APIError(400, msg, param=param, code="unsupported_parameter") from None
            accepted = ", ".join(f for f in _accepted_fields(model, param))
            raise APIError(400, f"unknown parameter {param!r}; accepted: {accepted}",
                           param=param, code="unknown_parameter") from None
        if kind == "missing":
            raise APIError(400, f"{param!r} is required", param=param,
                           code="missing_required_parameter") from None
        if field in _EXPECTED and kind.endswith("_type"):
            msg = f"{param!r} must be {_EXPECTED[field]}"
        else:
            msg = f"{param!r}: {err['msg'].removeprefix('Value error, ')}"
            if kind != "value_error" and "input" in err:  # our own messages say what came
                msg += f", got {err['input']!r}"
        raise APIError(400, msg[:500], param=param or None, code="invalid_value") from None
    req.check_supported()
    return req


def _accepted_fields(model: type[BaseModel], param: str) -> list[str]:
    if param.startswith("messages"):
        return list(ChatMessage.model_fields)
    if param.startswith("stream_options"):
        return list(StreamOptions.model_fields)
    return list(model.model_fields)
