"""What a request to the HTTP gateway must pass before its app reads it: the API key, then the
size of its body (an ASGI middleware, ``Intake``).

The key is checked from the headers alone, so a caller without it cannot make the gateway read,
hold or parse one byte of a body. A body is at most ``max_body`` bytes: a larger
``Content-Length`` is refused before reading, and a chunked body as soon as it grows past the
limit, so memory per request stays bounded whatever a client sends. Refusals carry OpenAI's error
body and close the connection, leaving the rest of the body unread. The body read here is handed
to the app whole.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from swapmoe.gateway import openai_api as api

# A body holds one prompt, which must fit the executor's context (at most a few thousand tokens):
# 4 MiB is far beyond any prompt that fits, and bounds what JSON parsing of one body can allocate.
MAX_BODY_BYTES = 4 << 20


class _Gone(Exception):
    """The client disconnected before its body was read."""


class Intake:
    """ASGI middleware: paths under ``guarded`` need ``Authorization: Bearer <api_key>`` (None:
    open), every body is at most ``max_body`` bytes."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY_BYTES, guarded: str = "/v1/"):
        self.app, self.api_key, self.max_body, self.guarded = app, api_key, max_body, guarded

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key and scope["path"].startswith(self.guarded):
            if error := api.key_error(headers.get("authorization"), self.api_key):
                return await _refuse(error, scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _refuse(self._too_large(), scope, receive, send)
        try:
            body = await _read_body(receive, self.max_body)
        except _Gone:
            return None  # nobody is left to answer
        if body is None:
            return await _refuse(self._too_large(), scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self) -> api.ApiError:
        return api.ApiError(413, f"the request body is over {self.max_body} bytes", code="request_too_large")


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (the rest is left unread)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that gives the app ``body`` first, then what the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


async def _refuse(error: api.ApiError, scope, receive, send) -> None:
    """Answer ``error`` and close the connection: any body the client still sends stays unread."""
    response = JSONResponse(error.body(), status_code=error.status, headers={"connection": "close"})
    await response(scope, receive, send)
