"""Servers and channels as every SwapMoE process opens them.

``start_server`` adds the error interceptor (``swapmoe.rpc.status``), bounds on every
request's fields (``swapmoe.rpc.bounds``), bounded slots for streams (``swapmoe.rpc.streams``), ``grpc.health.v1`` and server reflection, so stock tools
(grpcurl, grpc_health_probe) can discover any of our servers; servers and channels share
keepalive and message-size limits.
"""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from swapmoe.rpc.bounds import BoundsInterceptor
from swapmoe.rpc.security import ClientSecurity, ServerSecurity
from swapmoe.rpc.status import ErrorInterceptor
from swapmoe.rpc.streams import StreamLimiter, pool_size

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
    stream_limits: dict[str, int] | None = None,
    unary_threads: int = 8,
    security: ServerSecurity | None = None,
) -> Server:
    """Start a server with ``register`` adding the servicers; ``address`` port 0 picks a free port.
    ``stream_limits`` bounds the open streams of each streaming method (short name: count);
    ``unary_threads`` threads are left for unary calls whatever the streams hold. ``security``:
    TLS and the tokens accepted (default: plaintext, every call allowed, loopback only)."""
    limits = stream_limits or {}
    security = security or ServerSecurity()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=pool_size(limits, unary_threads), thread_name_prefix="grpc"),
        interceptors=[*security.interceptors(), ErrorInterceptor(), BoundsInterceptor(), StreamLimiter(limits)],
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
    port = security.add_port(server, address)
    server.start()
    return Server(server, port, health_servicer)


def channel(address: str, security: ClientSecurity | None = None) -> grpc.Channel:
    """A channel with the project's keepalive and message-size limits: TLS and a token when
    ``security`` has them, else plaintext."""
    if security is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return security.channel(address, CHANNEL_OPTIONS)
