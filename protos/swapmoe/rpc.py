"""gRPC plumbing shared by every SwapMoE server and client.

One interceptor turns exceptions into statuses (``InvalidField`` and other
``ValueError``s become INVALID_ARGUMENT with a message naming the field), and
every server also serves ``grpc.health.v1`` and server reflection so stock tools
(grpcurl, grpc_health_probe) can discover it.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MiB = 1 << 20
# Keepalive: find dead peers (a device that lost its network) within ~40 s, and
# let clients ping without data so long-lived streams survive idle NATs.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * MiB),
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


class Unavailable(RuntimeError):
    """The service cannot take this request now (maps to UNAVAILABLE)."""


class Busy(RuntimeError):
    """A bounded resource is full (maps to RESOURCE_EXHAUSTED)."""


class NotFound(LookupError):
    """A named thing does not exist (maps to NOT_FOUND)."""


_STATUS = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception) -> grpc.StatusCode:
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return error.code()  # an upstream call failed: pass its status on
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions escaping a handler to gRPC statuses, for unary and streaming responses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_guard_unary(handler.stream_unary, method))
        return handler._replace(stream_stream=_guard_stream(handler.stream_stream, method))


def _abort(context: grpc.ServicerContext, error: Exception, method: str):
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    if isinstance(error, grpc.RpcError) and hasattr(error, "details"):
        message = f"upstream call failed: {error.code().name}: {error.details()}"
    else:
        message = str(error) or type(error).__name__
    context.abort(code, message)


def _guard_unary(fn: Callable, method: str) -> Callable:
    def guarded(request, context):
        try:
            return fn(request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            if context.code() is not None:
                raise  # the handler already set a status (context.abort)
            _abort(context, error, method)

    return guarded


def _guard_stream(fn: Callable, method: str) -> Callable:
    def guarded(request, context):
        try:
            yield from fn(request, context)
        except Exception as error:  # noqa: BLE001
            if context.code() is not None:
                raise
            _abort(context, error, method)

    return guarded


@dataclass
class Server:
    """A started gRPC server and the port it is bound to."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer

    def stop(self, grace: float | None = 5.0) -> None:
        """Mark NOT_SERVING, then let in-flight calls finish for up to ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()


def start_server(
    register: Callable[[grpc.Server], None],
    service_names: Iterable[str],
    address: str = "127.0.0.1:0",
    max_workers: int = 32,
) -> Server:
    """Start a server with ``register`` adding the servicers; ``address`` port 0 picks a free port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[ErrorInterceptor()],
        options=SERVER_OPTIONS,
    )
    register(server)
    names = list(service_names)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    server.start()
    return Server(server, port, health_servicer)


def channel(address: str) -> grpc.Channel:
    """An insecure channel with the project's keepalive and message-size limits."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
