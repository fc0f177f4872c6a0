"""The OpenAI request bodies lmforge serve accepts, and turning raw request bytes into one of them with errors a
person can act on (OpenAI's shape: {"error": {"message", "type", "param", "code"}}).

Bodies are parsed here, not by FastAPI: decoding, JSON parsing and validation run on a worker thread (the
event loop never parses a large body), and every failure is a 400 that says what was wrong and where
(invalid UTF-8 names the byte offset, invalid JSON the line and column, a bad value the field).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lm_core.sampling import TOP_LOGPROBS

MAX_STOPS = 4


class RequestError(Exception):
    """A request that cannot be served; rendered as an OpenAI-shaped error with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share. top_k is an extension (as in vLLM)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # validated into a list
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(s == "" for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        return stops

    def unsupported(self) -> dict[str, bool]:
        """Fields this server accepts but cannot honour when set: each is refused with a 400 naming it."""
        return {"presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                "logit_bias": bool(self.logit_bias)}


class CompletionRequest(SamplingFields):
    """OpenAI's (legacy) completions API."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and (len(value) == 0 or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty (an empty list, or an empty list of token ids)")
        return value

    def unsupported(self) -> dict[str, bool]:
        return {**super().unsupported(), "best_of": self.best_of not in (None, self.n), "suffix": self.suffix is not None}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...: not used by the template
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    """OpenAI's chat completions API (text only)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> dict[str, bool]:
        return {**super().unsupported(), "tools": bool(self.tools),
                "response_format": (self.response_format or {}).get("type", "text") != "text"}

    @property
    def completion_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(raw: bytes, kind: type[BaseModel]) -> BaseModel:
    """UTF-8 JSON bytes -> a validated request, or a RequestError(400) that says what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"The request body is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                                f"{exc.start}); send the JSON body encoded as UTF-8.", code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                                f"{exc.colno}. Send a JSON object, e.g. {{\"model\": ..., \"prompt\": ...}}.",
                           code="invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"The request body must be a JSON object, not {type(data).__name__}.", code="invalid_json")
    try:
        request = kind.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    refused = [name for name, used in request.unsupported().items() if used]
    if refused:
        name = refused[0]
        raise RequestError(400, f"{name}={getattr(request, name)!r} is not supported by this server; leave {name} unset",
                           name, "unsupported_parameter")
    return request


def validation_error(errors: list[dict]) -> RequestError:
    """Pydantic's errors as one readable 400: 'temperature: Input should be less than or equal to 2'."""
    problems, param = [], None
    for e in errors:
        where = ".".join(str(p) for p in e["loc"] if p != "body")
        problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        if param is None and where:
            param = where.split(".")[0]
    return RequestError(400, "; ".join(problems) or "invalid request", param, "invalid_value")
