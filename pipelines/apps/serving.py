"""An OpenAI-compatible HTTP server for an exported model: `/v1/completions` and `/v1/chat/completions` (plain
JSON, or server-sent events when `stream` is true), `/v1/models`, `/v1/models/{id}` and `/health`.
`lmforge serve` runs it with uvicorn.

All requests share one generation engine (lm_core.generation_engine) that runs on its own thread: each
request's prompts (times `n`) are submitted to it and join the running batch at the next step, so
concurrent clients are decoded together. Events come back to the event loop through a queue per request.
A request whose client goes away is cancelled and its rows leave the batch at the next step: Starlette
cancels a stream when the client disconnects, and a plain request watches for the disconnect itself.

The event loop only moves bytes: a body over the size limit is refused (413) before it is read whole, and
decoding, JSON parsing, validation, the chat template and tokenization run on worker threads. A prompt
whose character count alone proves it longer than the context is refused without being tokenized.
Errors use OpenAI's shape (pipelines.apps.openai_schema): 400 for a body that is not UTF-8 JSON, has
invalid values, or cannot be served (too long, unsupported options), 404 for an unknown model or path,
413 for a body over the limit.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lm_core.generation_engine import EngineConfig, GenerationEngine, GenerationRequest
from lm_core.generation_rows import GenerationEvent
from lm_core.quantize import prepare_for_inference
from lm_core.tokenizer import Tokenizer
from lm_core.weights import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE, TOKENIZER_FILE, load_model_dir
from pipelines.apps import openai_format as fmt
from pipelines.apps.openai_plans import Plan, check_model, plan_chat, plan_completion
from pipelines.apps.openai_schema import RequestError

MAX_BODY_BYTES = 4 * 1024 * 1024  # a full-context batch of 32 prompts is well under this


class ServedModel:
    """The model, its tokenizer, chat template and generation engine, and what /health reports."""

    def __init__(self, model_dir: Path, name: str | None = None, dtype: str = "fp32", engine: EngineConfig | None = None,
                 device: str = "cpu"):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        model, meta = load_model_dir(model_dir)
        self.model = prepare_for_inference(model.to(device), dtype)  # fp32 | bf16 | int8 (lm_core.quantize)
        self.dtype = dtype
        self.tokenizer = Tokenizer(Path(model_dir) / TOKENIZER_FILE)
        self.texts = fmt.TokenTexts(self.tokenizer)
        self.max_piece_chars = max(max(self.texts.width), 1)
        self.name = name or meta.get("name") or Path(model_dir).resolve().name
        self.block_size = self.model.cfg.block_size
        self.created = int(time.time())
        template = Path(model_dir) / CHAT_TEMPLATE_FILE  # exports made before templates existed get the default
        source = template.read_text(encoding="utf-8") if template.is_file() else CHAT_TEMPLATE
        self.chat_template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
        self.engine = GenerationEngine(self.model, engine or EngineConfig(), tokenizer=self.tokenizer).start()

    def health(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {"status": "ok", "model": self.name, "dtype": self.dtype, "active": self.engine.active,
                "requests": stats.requests, "tokens_generated": stats.tokens_generated, "steps": stats.steps,
                "slots": self.engine.cache.slots}

    def card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "max_model_len": self.block_size}


class Generation:
    """One HTTP request's engine requests, with their events delivered on the event loop: each as it comes for
    a stream; for a plain request, all of a request's events at once when it finishes (waking the event loop
    once per request instead of once per token keeps the GIL for the engine)."""

    def __init__(self, engine: GenerationEngine, requests: list[GenerationRequest], stream: bool):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[GenerationEvent]] = asyncio.Queue()
        self._engine = engine
        held: dict[int, list[GenerationEvent]] = {}

        def deliver(event: GenerationEvent) -> None:  # on the engine's thread
            batch = held.setdefault(event.request_id, [])
            batch.append(event)
            if not stream and event.finish_reason is None:
                return
            del held[event.request_id]
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, batch)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        for request in requests:
            request.on_event = deliver
        self._index: dict[int, int] = {}
        self._open: set[int] = set()
        try:
            for i, request in enumerate(requests):
                rid = engine.submit(request)
                self._index[rid] = i
                self._open.add(rid)
        except ValueError as exc:
            self.cancel()
            raise RequestError(400, str(exc), "prompt") from None

    async def events(self) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """(choice index, event) until every request has finished."""
        while self._open:
            for event in await self._queue.get():
                if event.finish_reason is not None:
                    self._open.discard(event.request_id)
                if event.finish_reason == "error":
                    self.cancel()
                    raise RequestError(500, f"generation failed: {event.error}", code="generation_failed")
                yield self._index[event.request_id], event

    def cancel(self) -> None:
        for rid in self._open:
            self._engine.cancel(rid)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    too_large = f"; this server takes at most {limit:,} bytes (lmforge serve --max-body-mb)"
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"The request body is {int(length):,} bytes{too_large}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The request body is over {limit:,} bytes{too_large}", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model_dir: Path | str, *, model_name: str | None = None, dtype: str = "fp32",
               engine: EngineConfig | None = None, max_body_bytes: int = MAX_BODY_BYTES, device: str = "cpu") -> FastAPI:
    served = ServedModel(Path(model_dir), model_name, dtype, engine, device)
    app = FastAPI(title="lmforge", summary=f"OpenAI-compatible completions and chat for {served.name}")
    app.state.served = served
    app.router.add_event_handler("shutdown", served.engine.stop)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:  # unknown paths and methods
        code = "not_found" if exc.status_code == 404 else None
        error = RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return served.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(served, model_id)
        return served.card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        plan = await _plan(request, plan_completion)
        return await _respond(request, plan)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        plan = await _plan(request, plan_chat)
        return await _respond(request, plan)

    async def _plan(request: Request, planner) -> Plan:
        body = await read_body(request, max_body_bytes)
        return await anyio.to_thread.run_sync(planner, served, body)  # parse, validate, tokenize off the loop

    async def _respond(request: Request, plan: Plan):
        generation = Generation(served.engine, plan.requests, plan.stream)
        if plan.stream:
            return StreamingResponse(_sse(served, plan, generation), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collect = asyncio.ensure_future(_collect(plan, generation))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # nobody is waiting for the answer: stop generating
                generation.cancel()
                collect.cancel()
        return plan.body(served, collect.result())

    return app


async def _collect(plan: Plan, generation: Generation) -> list[fmt.Choice]:
    choices = plan.new_choices()
    async for index, event in generation.events():
        choices[index].add(event)
    return choices


async def _until_disconnect(request: Request) -> None:
    # the body has been read, so the next message is the disconnect (or nothing, until the response is sent)
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(served: ServedModel, plan: Plan, generation: Generation) -> AsyncIterator[str]:
    choices = plan.new_choices()
    try:
        for first in plan.opening_chunks(served):
            yield _event(first)
        async for index, event in generation.events():
            choice = choices[index]
            choice.add(event)
            if (chunk := plan.chunk(served, choice, event)) is not None:
                yield _event(chunk)
        if plan.include_usage:
            yield _event(plan.usage_chunk(served, choices))
        yield "data: [DONE]\n\n"
    except RequestError as exc:  # the stream has started: the error goes in the stream
        yield _event(exc.body())
    finally:
        generation.cancel()  # a no-op when every request has finished; frees the rows of a dropped stream


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(model_dir: Path | str, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          log_level: str = "info", dtype: str = "fp32", engine: EngineConfig | None = None,
          max_body_bytes: int = MAX_BODY_BYTES, device: str = "cpu") -> None:
    """Serve until interrupted. 127.0.0.1 by default: pass host="0.0.0.0" to accept other machines."""
    import uvicorn

    app = create_app(model_dir, model_name=model_name, dtype=dtype, engine=engine, max_body_bytes=max_body_bytes,
                     device=device)
    served = app.state.served
    print(f"serving model '{served.name}' ({dtype}, {served.engine.cache.slots} slots) from {model_dir} "
          f"at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
