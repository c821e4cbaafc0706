"""An OpenAI-compatible HTTP front for executors: the ASGI app (FastAPI).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events,
``data: {...}`` then ``data: [DONE]``, or whole), ``GET /v1/models`` and ``GET /health``. Each
request is one Generate call on an executor (``executor_pool``), so it takes its turn in that
executor's queue and continuous batch like any gRPC client; the mapping to and from OpenAI's
JSON is ``openai_api``. Before the app reads a request, ``http_intake`` checks its API key and
bounds its body; every answer other than 200 has OpenAI's error body, an unexpected failure too.

The first chunk is awaited before the HTTP status is sent, so the executor's refusals (a bad
field, a full queue) become HTTP statuses even for streams; a failure after that ends the
stream with an ``error`` event. A client that disconnects (mid-stream, or while waiting for a
whole answer) cancels the call, and the executor drops the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from swapmoe.gateway import openai_api as api
from swapmoe.gateway.executor_pool import ExecutorPool, Generation
from swapmoe.gateway.http_intake import MAX_BODY_BYTES, Intake

DISCONNECT_POLL_S = 0.25  # how often a whole (non-streamed) answer checks that its client is still there


@dataclass
class Settings:
    """What a gateway serves: ``model`` (the name clients ask for) on ``pool``; ``tokenizer``
    (transformers') renders chat templates (None: chat answers 400); ``api_key`` (None: open);
    ``timeout_s`` bounds each Generate call (DEADLINE_EXCEEDED: 504); ``max_body`` each request's
    body (larger: 413)."""

    pool: ExecutorPool
    model: str
    tokenizer: object | None = None
    api_key: str | None = None
    timeout_s: float | None = 600.0
    max_body: int = MAX_BODY_BYTES
    started: int = field(default_factory=lambda: int(time.time()))


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer (with its chat template, if it has one); transformers without torch."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await settings.pool.close()

    app = FastAPI(title="SwapMoE OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(api.ApiError)
    async def api_error(request, error: api.ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown path, wrong method
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return await api_error(request, api.ApiError(error.status_code, str(error.detail), kind))

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):  # a bug: OpenAI's error body; uvicorn logs the traceback
        return await api_error(request, api.ApiError(500, "the gateway failed to answer this request",
                                                     "server_error"))

    app.add_middleware(Intake, api_key=settings.api_key, max_body=settings.max_body)
    v1 = APIRouter(prefix="/v1")

    @app.get("/health")
    async def health():
        executors = await settings.pool.health()
        serving = any(s == "SERVING" for s in executors.values())
        return JSONResponse({"status": "ok" if serving else "unavailable", "executors": executors},
                            status_code=200 if serving else 503)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model, "object": "model", "created": settings.started,
                                            "owned_by": "swapmoe"}]}

    @v1.post("/completions")
    async def completions(request: Request):
        body = api.parse_body(await request.body(), api.CompletionBody)
        _check(body, settings)
        prompt = api.completion_prompt(body)
        return await _answer(settings, request, api.Reply(api.COMPLETIONS, settings.model), body, prompt,
                             body.max_tokens or api.COMPLETION_MAX_TOKENS)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = api.parse_body(await request.body(), api.ChatBody)
        _check(body, settings)
        prompt = api.render_chat(settings.tokenizer, settings.model, body.messages)
        return await _answer(settings, request, api.Reply(api.CHAT, settings.model), body, prompt,
                             body.max_completion_tokens or body.max_tokens or api.CHAT_MAX_TOKENS)

    app.include_router(v1)
    return app


def _check(body, settings: Settings) -> None:
    if body.model != settings.model:
        raise api.ApiError(404, f"the model {body.model!r} does not exist; this server serves {settings.model!r}",
                           "not_found_error", param="model", code="model_not_found")
    if error := body.unsupported():
        raise error


async def _answer(settings: Settings, request: Request, reply: api.Reply, body, prompt, max_tokens: int):
    generate = api.generate_request(body, prompt, max_tokens, reply.id)
    try:
        generation = await _unless_client_leaves(request, settings.pool.generate(generate, settings.timeout_s))
    except grpc.aio.AioRpcError as error:
        raise api.error_from_rpc(error.code(), error.details(), reply.endpoint.prompt_param) from None
    if body.stream:
        return EventStream(_events(reply, generation, body.include_usage), generation)
    try:
        result = await _unless_client_leaves(request, _collect(generation))
    except grpc.aio.AioRpcError as error:
        raise api.error_from_rpc(error.code(), error.details(), reply.endpoint.prompt_param) from None
    return reply.whole(result)


async def _collect(generation: Generation) -> api.Result:
    result = api.Result()
    async for chunk in generation.chunks():
        result.add(chunk)
    if result.finish_reason is None:
        raise api.ApiError(502, "the executor ended the stream without a final chunk", "server_error")
    return result


async def _unless_client_leaves(request: Request, awaitable):
    """``awaitable``'s result, cancelled (and so its Generate call) when the client disconnects."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise api.ApiError(499, "the client closed the request", "cancelled")
    finally:
        task.cancel()  # no-op once done; here when this handler itself is cancelled


async def _events(reply: api.Reply, generation: Generation, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per executor chunk with text, the finish reason on the last,
    the usage chunk if asked for, then ``[DONE]``."""
    result, first = api.Result(), True
    try:
        async for chunk in generation.chunks():
            result.add(chunk)
            if chunk.text or chunk.finish_reason or first:
                yield _sse(reply.chunk(chunk.text, result.finish_reason if chunk.finish_reason else None, first))
                first = False
        if include_usage:
            yield _sse(reply.usage_chunk(result))
    except grpc.aio.AioRpcError as error:  # headers are sent: the error travels as an event
        yield _sse(api.error_from_rpc(error.code(), error.details(), reply.endpoint.prompt_param).body())
    finally:
        generation.close()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that cancels its Generate call however the response ends (the client
    disconnecting cancels the body's task; a failed write raises out of it)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], generation: Generation):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()
