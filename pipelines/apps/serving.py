"""An OpenAI-compatible HTTP server for an exported model: `/v1/completions` (plain JSON, or server-sent
events when `stream` is true), `/v1/models` and `/health`. `lmforge serve` runs it with uvicorn.

Every request runs lm_core's one generation loop with its own KV cache, stepped on a worker thread one
text chunk at a time, so concurrent requests share the model's weights and nothing else, and the event
loop stays free between steps. A request whose client goes away stops at the next step and drops its
cache: Starlette cancels a stream when the client disconnects, and a plain request checks for it.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 422 for a request that
does not parse (wrong type, out-of-range value, unknown field), 400 for one that parses but cannot be
served (prompt + max_tokens longer than the context, features this server does not implement), 404
for an unknown model name.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from lm_core.generate import SamplingConfig, TextChunk, stream_text
from lm_core.quantize import prepare_for_inference
from lm_core.tokenizer import Tokenizer
from lm_core.weights import TOKENIZER_FILE, load_model_dir

MAX_PROMPTS = 32  # prompts in one request: they run as one batch, whose cache grows with it
DISCONNECT_CHECK_EVERY = 8  # chunks between checks that a plain (non-stream) request's client is still there


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's legacy completions API; top_k is an extension (as in vLLM)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # validated into a list
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be an empty list")
        return value


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class ServedModel:
    """The model, its tokenizer, and counters that /health reports (and tests read)."""

    def __init__(self, model_dir: Path, name: str | None = None, dtype: str = "fp32"):
        model, meta = load_model_dir(model_dir)
        self.model = prepare_for_inference(model, dtype)  # fp32 | bf16 | int8 (lm_core.quantize)
        self.dtype = dtype
        self.tokenizer = Tokenizer(Path(model_dir) / TOKENIZER_FILE)
        self.name = name or meta.get("name") or Path(model_dir).resolve().name
        self.block_size = self.model.cfg.block_size
        self.created = int(time.time())
        self._lock = threading.Lock()
        self.active = 0  # generations running now
        self.requests = 0
        self.tokens_generated = 0

    def count(self, active: int = 0, tokens: int = 0, requests: int = 0) -> None:
        with self._lock:
            self.active += active
            self.tokens_generated += tokens
            self.requests += requests


class _Job:
    """One request's generation, stepped from the event loop on worker threads. The lock keeps close()
    from running while a step is (a generator cannot be closed from another thread mid-step)."""

    def __init__(self, served: ServedModel, chunks: Iterator[TextChunk]):
        self._served, self._chunks, self._lock = served, chunks, threading.Lock()
        self._closed = False
        self._tokens: dict[int, int] = {}  # per prompt, as last reported
        served.count(active=1, requests=1)

    def step(self) -> TextChunk | None:
        with self._lock:
            if self._closed:
                return None
            chunk = next(self._chunks, None)
        if chunk is not None:
            self._served.count(tokens=chunk.tokens - self._tokens.get(chunk.index, 0))
            self._tokens[chunk.index] = chunk.tokens
        return chunk

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._chunks.close()  # ends the loop: its KV cache is dropped with it
                self._served.count(active=-1)

    async def chunks(self) -> AsyncIterator[TextChunk]:
        import anyio

        try:
            while (chunk := await run_in_threadpool(self.step)) is not None:
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):  # also when cancelled: wait for the running step, then stop
                await run_in_threadpool(self.close)


def _prepare(served: ServedModel, req: CompletionRequest) -> tuple[list[list[int]], SamplingConfig]:
    if req.model != served.name:
        raise RequestError(404, f"The model '{req.model}' does not exist; this server serves '{served.name}' "
                                f"(see /v1/models)", "model", "model_not_found")
    unsupported = {"n": req.n != 1, "best_of": req.best_of not in (None, 1), "echo": req.echo,
                   "logprobs": req.logprobs is not None, "suffix": req.suffix is not None,
                   "presence_penalty": req.presence_penalty != 0, "frequency_penalty": req.frequency_penalty != 0,
                   "logit_bias": bool(req.logit_bias)}
    for param, used in unsupported.items():
        if used:
            raise RequestError(400, f"{param}={getattr(req, param)!r} is not supported by this server; leave {param} "
                                    f"unset", param, "unsupported_parameter")
    tok = served.tokenizer
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if len(raw) > MAX_PROMPTS:
        raise RequestError(400, f"{len(raw)} prompts in one request; send at most {MAX_PROMPTS} per request", "prompt")
    prompts = []
    for p in raw:
        if isinstance(p, str):
            prompts.append(tok.encode(p, bos=True))
        else:
            bad = [i for i in p if not 0 <= i < tok.vocab_size]
            if bad or not p:
                raise RequestError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{tok.vocab_size - 1})"
                                   if bad else "a token-id prompt is empty", "prompt")
            prompts.append(list(p))
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    longest = max(map(len, prompts))
    if longest + max_tokens > served.block_size:
        raise RequestError(400, f"This model's maximum context length is {served.block_size} tokens. However, you "
                                f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for "
                                f"the completion). Please reduce the prompt or max_tokens.", "max_tokens",
                           "context_length_exceeded")
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=None if req.top_p >= 1.0 else req.top_p, seed=req.seed)
    return prompts, sampling


def create_app(model_dir: Path | str, *, model_name: str | None = None, dtype: str = "fp32") -> FastAPI:
    served = ServedModel(Path(model_dir), model_name, dtype)
    app = FastAPI(title="lmforge", summary=f"OpenAI-compatible completions for {served.name}")
    app.state.served = served

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        param = next((str(p) for p in first if p != "body"), None)
        return _error(422, "; ".join(problems), param)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "dtype": served.dtype, "active": served.active,
                "requests": served.requests, "tokens_generated": served.tokens_generated}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "lmforge", "max_model_len": served.block_size}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts, sampling = _prepare(served, req)
        job = _Job(served, stream_text(served.model, served.tokenizer, prompts, sampling, stop=req.stop))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.name}
        prompt_tokens = sum(map(len, prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, head, prompt_tokens, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(len(prompts))]
        completion_tokens, n = 0, 0
        chunks = job.chunks()
        try:
            async for chunk in chunks:
                choice = choices[chunk.index]
                choice["text"] += chunk.text
                if chunk.finish_reason is not None:
                    choice["finish_reason"] = chunk.finish_reason
                    completion_tokens += chunk.tokens
                n += 1
                if n % DISCONNECT_CHECK_EVERY == 0 and await request.is_disconnected():
                    break  # nobody is waiting for the answer: stop generating
        finally:
            await chunks.aclose()
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return {**head, "choices": choices, "usage": usage}

    return app


async def _sse(job: _Job, head: dict, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    completion_tokens = 0
    chunks = job.chunks()
    try:
        async for chunk in chunks:
            if chunk.finish_reason is not None:
                completion_tokens += chunk.tokens
            choice = {"index": chunk.index, "text": chunk.text, "logprobs": None, "finish_reason": chunk.finish_reason}
            yield _event({**head, "choices": [choice]})
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield _event({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(model_dir: Path | str, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          log_level: str = "info", dtype: str = "fp32") -> None:
    """Serve until interrupted. 127.0.0.1 by default: pass host="0.0.0.0" to accept other machines."""
    import uvicorn

    app = create_app(model_dir, model_name=model_name, dtype=dtype)
    print(f"serving model '{app.state.served.name}' ({dtype}) from {model_dir} at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
