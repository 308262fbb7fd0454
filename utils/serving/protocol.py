"""The OpenAI request shapes the server accepts, and the rules that turn a request into decoding settings.

Every problem is an ``APIError`` that the server answers with OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}``: 400 ``invalid_request_error`` naming the field in ``param``
for an invalid request (never FastAPI's 422), 404 ``model_not_found``, 401, 413, 429, 503, 504. Messages never
carry a path or a traceback.

The schemas accept unknown extra fields (``user``, ``metadata``, ...), as OpenAI does. Known parameters the
server does not implement (``tools``, ``response_format`` other than text, ``logit_bias``, non-zero
``presence_penalty`` / ``frequency_penalty``, ``suffix``, ``best_of`` other than ``n``, media content parts) are
refused with a 400 that names them: none is ever silently ignored.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

INT64 = 2 ** 63 - 1
MAX_STOP = 4
MAX_LOGPROBS = 5  # completions' logprobs, and chat's top_logprobs


class APIError(Exception):
    """An answer other than success: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- pieces ---------------------------------------------------------------------------------------

class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class _Sampling(_Open):
    """The decoding parameters chat and completions share (bounds as OpenAI documents them)."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-INT64 - 1, le=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(default=None, ge=-1, le=INT64)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    min_tokens: int = Field(default=0, ge=0, le=INT64)
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT64)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1, le=INT64)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[int]


class ChatGLMRequest(_Open):
    """ChatGLM-6B api.py's body; falsy values take its defaults (2048 total tokens, top_p 0.7, temperature 0.95)."""

    prompt: str
    history: list[list[str]] | None = None
    max_length: int | None = Field(default=None, ge=0, le=INT64)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)


# -- responses (documented in /openapi.json) -----------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: Union[str, int, None] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    tokenizer_class: str


class ChatGLMResponse(BaseModel):
    response: str
    history: list[list[str]]
    status: int
    time: str


class Health(BaseModel):
    status: str


# -- request rules ------------------------------------------------------------------------------------


def refuse_unsupported(req: _Sampling) -> None:
    """Known OpenAI parameters this server does not implement: a 400 naming the field, never ignored."""
    if req.presence_penalty:
        raise invalid("presence_penalty", "presence_penalty is not supported (use repetition_penalty)")
    if req.frequency_penalty:
        raise invalid("frequency_penalty", "frequency_penalty is not supported (use repetition_penalty)")
    if req.logit_bias:
        raise invalid("logit_bias", "logit_bias is not supported")
    if isinstance(req, ChatCompletionRequest):
        for name in ("tools", "tool_choice", "functions", "function_call"):
            value = getattr(req, name)
            if value not in (None, [], "none"):
                raise invalid(name, f"{name} is not supported: this server does not call tools")
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise invalid("response_format", "response_format: only {\"type\": \"text\"} is supported")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise invalid("suffix", "suffix is not supported")
        if req.best_of is not None and req.best_of != req.n:
            raise invalid("best_of", "best_of must equal n (no server-side candidates are ranked)")


def stop_strings(stop: str | list[str] | None, implied: str | None = None) -> tuple[str, ...]:
    """The request's stop strings (at most 4); ``implied``, the EOS token's text, is dropped first: EOS ends a
    row anyway, and lm-eval adds it to a task's own stop strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    items = [s for s in items if not implied or s != implied]
    if len(items) > MAX_STOP:
        raise invalid("stop", f"stop: at most {MAX_STOP} stop strings, got {len(items)}")
    if any(not s for s in items):
        raise invalid("stop", "stop: stop strings must be non-empty")
    return tuple(items)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def message_list(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(role, text) pairs; text parts are joined; other roles and media parts are refused."""
    out = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise invalid(f"messages.{i}.role", f"messages[{i}].role: unknown or unsupported role {m.role!r} "
                          "(system, developer, user or assistant)")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages.{i}.content.{j}.type",
                                  f"messages[{i}].content[{j}]: only text parts are supported, got {part.type!r}")
                texts.append(part.text)
            text = "".join(texts)
        else:
            text = m.content or ""
        out.append((role, text))
    return out


def finite(value: float | None, param: str) -> None:
    if value is not None and not math.isfinite(value):
        raise invalid(param, f"{param} must be a finite number")
