"""The executors an HTTP gateway sends Generate calls to, on asyncio (grpc.aio).

A request goes to the executor with the fewest of this gateway's streams open (ties in turn),
so one gateway spreads a burst across its executors. A call refused before its first chunk
because the executor is away (UNAVAILABLE) or its queue is full (RESOURCE_EXHAUSTED) goes to
the next executor; once tokens flow, an error is the caller's (a retry would repeat them).

A ``Generation`` is one open call. Closing it cancels the call, which the executor sees
between tokens and while the request is queued: it drops the request, so a client that leaves
frees its row of the batch.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.rpc import transport
from swapmoe.rpc.security import ClientSecurity
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

EXECUTOR_SERVICE = epb.DESCRIPTOR.services_by_name["ExecutorService"].full_name
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
HEALTH_TIMEOUT_S = 2.0


class Generation:
    """One Generate call whose first chunk has arrived."""

    def __init__(self, pool: "ExecutorPool", address: str, call, first: epb.GenerateResponse | None):
        self.address, self._pool, self._call, self._first = address, pool, call, first
        self._closed = False

    async def chunks(self) -> AsyncIterator[epb.GenerateResponse]:
        """Every chunk, the first included; the call is closed after the last."""
        try:
            chunk = self._first
            while chunk is not None and chunk is not grpc.aio.EOF:
                yield chunk
                chunk = await self._call.read()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the call unless it has ended (the executor drops the request). Synchronous, so
        it also runs inside a cancelled task."""
        if not self._closed:
            self._closed = True
            self._call.cancel()
            self._pool._open[self.address] -= 1


class ExecutorPool:
    """Channels to ``addresses`` (with ``security``'s TLS and token), opened on first use in the
    running event loop."""

    def __init__(self, addresses: Sequence[str], security: ClientSecurity | None = None):
        if not addresses:
            raise ValueError("--executor: give at least one executor address")
        self.addresses = list(addresses)
        self._security = security
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._open: Counter[str] = Counter()
        self._turn = itertools.count()

    def order(self) -> list[str]:
        """Executors to try, least-loaded first; ties in rotating order."""
        start = next(self._turn) % len(self.addresses)
        rotated = self.addresses[start:] + self.addresses[:start]
        return sorted(rotated, key=lambda a: self._open[a])  # stable: the rotation breaks ties

    async def generate(self, request: epb.GenerateRequest, timeout: float | None) -> Generation:
        """Open ``request`` on an executor and wait for its first chunk, so a refusal (a bad field,
        a full queue) raises ``grpc.aio.AioRpcError`` here, before any answer is sent."""
        failure = None
        for address in self.order():
            self._open[address] += 1
            call = self._stub(address).Generate(request, timeout=timeout)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as error:
                self._open[address] -= 1
                if error.code() not in RETRIED:
                    raise
                failure = error
                continue
            except BaseException:  # the HTTP client left while the request was queued
                call.cancel()
                self._open[address] -= 1
                raise
            return Generation(self, address, call, first)
        raise failure

    async def health(self) -> dict[str, str]:
        """Each executor's ``grpc.health.v1`` status (SERVING, NOT_SERVING, or the failed call's status)."""
        async def check(address: str) -> str:
            stub = health_pb2_grpc.HealthStub(self._channel(address))
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE),
                                         timeout=HEALTH_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        statuses = await asyncio.gather(*(check(a) for a in self.addresses))
        return dict(zip(self.addresses, statuses))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    def _stub(self, address: str) -> executor_pb2_grpc.ExecutorServiceStub:
        return executor_pb2_grpc.ExecutorServiceStub(self._channel(address))

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            options = transport.CHANNEL_OPTIONS
            self._channels[address] = (self._security.aio_channel(address, options) if self._security
                                       else grpc.aio.insecure_channel(address, options=options))
        return self._channels[address]
