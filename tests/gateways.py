"""An OpenAI-compatible gateway of its own for a test: the app in uvicorn on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading

import uvicorn

from swapmoe.gateway.openai_http import Settings, create_app

from polling import wait_until


@contextlib.contextmanager
def gateway_in_thread(settings: Settings):
    """The app in uvicorn on a free loopback port; yields the OpenAI base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=30, what="the gateway to start")
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(15)
