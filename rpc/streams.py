"""Bounded slots for long-lived streams, so they can never take every server thread.

A gRPC Python server runs each call on a thread of one pool, and a stream holds its thread
for as long as it is open. ``StreamLimiter`` gives each streaming method its own number of
slots; a stream past them is refused at once with RESOURCE_EXHAUSTED, and the server's pool
is sized as the sum of the slots plus threads kept for unary calls (``pool_size``). So
health checks, Describe and control calls answer however many streams are open.
"""

from __future__ import annotations

import threading
from typing import Callable

import grpc

from swapmoe.core.errors import Busy


def pool_size(stream_limits: dict[str, int], unary_threads: int) -> int:
    """Threads a server needs so that every stream slot and ``unary_threads`` unary calls run at once."""
    return sum(stream_limits.values()) + unary_threads


class StreamLimiter(grpc.ServerInterceptor):
    """At most ``limits[name]`` open streams of each method ``name`` (its short name, e.g.
    ``Subscribe``); unary methods and unnamed streaming methods pass through."""

    def __init__(self, limits: dict[str, int]):
        self.limits = dict(limits)
        self._slots = {name: threading.BoundedSemaphore(n) for name, n in limits.items()}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        name = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or name not in self._slots:
            return handler
        if handler.unary_stream:
            return handler._replace(unary_stream=self._limit(handler.unary_stream, name))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._limit(handler.stream_stream, name))
        return handler

    def _limit(self, fn: Callable, name: str) -> Callable:
        slots, limit = self._slots[name], self.limits[name]

        def limited(request, context):
            if not slots.acquire(blocking=False):
                raise Busy(f"{limit} {name} streams are open, the most this server serves at once; retry later")
            try:
                yield from fn(request, context)
            finally:
                slots.release()

        return limited
