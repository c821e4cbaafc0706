"""A grpc.aio server on an event loop of its own, for a service whose streams must not hold threads.

The planner keeps one Connect stream open per executor for the executor's whole life. A
synchronous gRPC server spends a thread on each; on asyncio, an idle stream is a suspended
coroutine, so 10,000 of them cost memory, not threads, and health checks and control calls
are answered by the same loop between messages. The loop runs on a thread, so callers (the
CLI, tests) start and stop it like the synchronous servers (``transport.Server``'s shape:
``port``, ``stop``); handlers that block (files, locks held by planner threads) run on
``pool`` via ``run_blocking``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from concurrent import futures
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from swapmoe.rpc.bounds import AioBoundsInterceptor
from swapmoe.rpc.security import ServerSecurity
from swapmoe.rpc.status import describe
from swapmoe.rpc.transport import SERVER_OPTIONS

log = logging.getLogger(__name__)


class AioServer:
    """A started grpc.aio server, its port, and the thread its loop runs on."""

    def __init__(self, port: int, loop: asyncio.AbstractEventLoop, server: grpc.aio.Server,
                 health_servicer, thread: threading.Thread, pool: futures.ThreadPoolExecutor,
                 on_stop: Iterable[Callable[[], None]] = ()):
        self.port, self.loop, self.grpc_server, self.health = port, loop, server, health_servicer
        self._thread, self._pool, self.on_stop = thread, pool, list(on_stop)
        self.on_stopping: list[Callable[[], None]] = []  # before the grace: end calls that never end by themselves

    def run(self, coroutine: Awaitable, timeout: float | None = None):
        """Run ``coroutine`` on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        """Mark NOT_SERVING, let in-flight calls finish for up to ``grace`` seconds, stop the loop.
        A second call does nothing."""
        if not self._thread.is_alive():
            return

        async def shutdown():
            await self.health.enter_graceful_shutdown()
            for fn in self.on_stopping:
                fn()
            await self.grpc_server.stop(grace)

        try:
            self.run(shutdown(), timeout=(grace or 0) + 10)
        except futures.TimeoutError:  # a call that ignores cancellation must not hang the process's exit
            log.warning("gRPC server on port %d did not stop within %.0f s; stopping its loop", self.port,
                        (grace or 0) + 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for fn in self.on_stop:
            fn()


def start_aio_server(register: Callable[[grpc.aio.Server], None], service_names: Iterable[str],
                     address: str = "127.0.0.1:0", pool_threads: int = 16,
                     security: ServerSecurity | None = None) -> AioServer:
    """Start a grpc.aio server with the error interceptor, health and reflection; ``register`` adds
    the servicers (called on the loop). Port 0 in ``address`` picks a free port; ``security`` as
    for ``transport.start_server``."""
    security = security or ServerSecurity()
    loop = asyncio.new_event_loop()
    pool = futures.ThreadPoolExecutor(max_workers=pool_threads, thread_name_prefix="grpc-aio")
    loop.set_default_executor(pool)
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="grpc-aio-loop")
    thread.start()

    async def start():
        server = grpc.aio.server(migration_thread_pool=pool, options=SERVER_OPTIONS,
                                 interceptors=[*security.aio_interceptors(), AioErrorInterceptor(),
                                               AioBoundsInterceptor()])
        register(server)
        names = list(service_names)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ["", *names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
        port = security.add_port(server, address)
        await server.start()
        return server, port, health_servicer

    try:
        server, port, health_servicer = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        raise
    return AioServer(port, loop, server, health_servicer, thread, pool)


async def run_blocking(fn: Callable, *args):
    """``fn(*args)`` on the loop's thread pool: for work that takes locks or reads files."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """``swapmoe.rpc.status.ErrorInterceptor`` for grpc.aio: exceptions escaping a coroutine or
    async-generator handler become the same statuses and messages."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind in ("unary_unary", "stream_unary"):
            fn = getattr(handler, kind)
            if fn is not None and inspect.iscoroutinefunction(fn):
                return handler._replace(**{kind: _guard_unary(fn, method)})
        for kind in ("unary_stream", "stream_stream"):
            fn = getattr(handler, kind)
            if fn is not None and inspect.isasyncgenfunction(fn):
                return handler._replace(**{kind: _guard_stream(fn, method)})
        return handler


async def _abort(context, error: Exception, method: str):
    await context.abort(*describe(error, method))


def _aborted(error: Exception) -> bool:
    """True for the exception ``context.abort`` raises to end a call (its status is set)."""
    return isinstance(error, grpc.aio.AbortError) or type(error).__name__ == "AbortError"


def _guard_unary(fn: Callable, method: str) -> Callable:
    async def guarded(request, context):
        try:
            return await fn(request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            if _aborted(error):
                raise
            await _abort(context, error, method)

    return guarded


def _guard_stream(fn: Callable, method: str) -> Callable:
    async def guarded(request, context):
        try:
            async for item in fn(request, context):
                yield item
        except Exception as error:  # noqa: BLE001
            if _aborted(error):
                raise
            await _abort(context, error, method)

    return guarded
