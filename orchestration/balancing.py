"""Client-side routing: send a Generate to a healthy, least-loaded executor serving a model.

The control node knows every executor of every planner, with its labels, the address it
serves on and its last throughput telemetry (``ListNodes``). A ``Router`` asks it for the
connected executors labelled ``model=<name>`` (cached ~2 s), orders them by load, checks the
first with ``grpc.health.v1`` and opens the stream there. A stream that fails before its
first chunk, because the executor went away (UNAVAILABLE) or its queue is full
(RESOURCE_EXHAUSTED), is retried on the next executor; once tokens flow, an error is the
caller's (a retry would repeat them).

Load is the executor's requests, running and waiting (``throughput.running`` and
``queue_depth``: a batch shares its passes, but each row slows the others), plus the streams this
router itself has open there (the telemetry is up to a second old, so a burst would
otherwise land on one executor); then an executor that produced no tokens in its last
report (idle) before one that did. Ties are broken at random, so clients spread out.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.core.errors import NotFound
from swapmoe.core.labels import parse_selector
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, fleet_pb2 as fpb, fleet_pb2_grpc, planner_pb2 as ppb

EXECUTOR_SERVICE = epb.DESCRIPTOR.services_by_name["ExecutorService"].full_name
CANDIDATES_TTL_S = 2.0
FAILURE_MEMORY_S = 10.0
HEALTH_TIMEOUT_S = 1.0
LIST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3
PAGE_SIZE = 500
_RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class NoExecutor(NotFound):
    """No connected executor serves the model (NOT_FOUND)."""


class Unavailable(ConnectionError):
    """Executors serve the model, but none answered (or the control node did not)."""


def list_nodes(stub: fleet_pb2_grpc.FleetServiceStub, selector: str = "", view: int = ppb.STATUS_VIEW_FULL,
               connected_only: bool = False, timeout: float = LIST_TIMEOUT_S) -> tuple[list[fpb.FleetNode], list[str]]:
    """Every node ``ListNodes`` answers, page after page, and the planners that did not answer."""
    nodes, unreachable, token = [], set(), ""
    while True:
        page = stub.ListNodes(fpb.ListNodesRequest(selector=selector, page_size=PAGE_SIZE, page_token=token,
                                                   view=view, connected_only=connected_only), timeout=timeout)
        nodes += page.nodes
        unreachable.update(page.unreachable_planners)
        token = page.next_page_token
        if not token:
            return nodes, sorted(unreachable)


class Router:
    """Routes Generate calls across a fleet through its control node at ``fleet_address``.

    ``channel_factory(address)`` opens the channels (to the control node and to executors;
    default: ``transport.channel``), so a secured fleet passes one with credentials. Safe to
    share between threads."""

    def __init__(self, fleet_address: str, channel_factory: Callable[[str], grpc.Channel] | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.fleet_address = fleet_address
        self._open = channel_factory or transport.channel
        self._rng = rng or random.Random()
        self._clock = clock
        self._channels: dict[str, grpc.Channel] = {}
        self._cache: dict[tuple[str, str], tuple[float, list[fpb.FleetNode], list[str]]] = {}
        self._failed: dict[str, float] = {}  # executor address -> when it last failed
        self._open_streams: Counter[str] = Counter()  # executor address -> this router's streams there
        self._lock = threading.Lock()

    # -- which executors ---------------------------------------------------------------------

    def candidates(self, model: str, selector: str = "") -> list[fpb.FleetNode]:
        """Connected executors labelled ``model=<model>`` (and matching ``selector``) that
        registered an address; raises NoExecutor when there are none."""
        nodes, unreachable = self._listed(model, selector)
        if nodes:
            return nodes
        raise NoExecutor(self._none_message(model, selector, unreachable))

    def pick(self, model: str, selector: str = "", exclude: frozenset[str] | set[str] = frozenset()) -> fpb.FleetNode:
        """The least-loaded healthy candidate whose address is not in ``exclude``; candidates
        that fail their health check are skipped (and skipped for ~10 s after)."""
        nodes = [n for n in self.candidates(model, selector) if n.status.executor_address not in exclude]
        skipped = []
        for node in self._by_load(nodes):
            address = node.status.executor_address
            if self._recently_failed(address):
                skipped.append(f"{node.status.node_id} ({address}, failed recently)")
            elif self._healthy(address):
                return node
            else:
                self.mark_failed(address)
                skipped.append(f"{node.status.node_id} ({address}, health check failed)")
        raise Unavailable(f"no executor serving model {model!r} is available: {', '.join(skipped) or 'all tried'}")

    def mark_failed(self, address: str) -> None:
        """Skip this executor for the next ~10 s."""
        with self._lock:
            self._failed[address] = self._clock()

    # -- calls -------------------------------------------------------------------------------

    def generate(self, model: str, request: epb.GenerateRequest, selector: str = "", timeout: float = 300.0,
                 attempts: int = MAX_ATTEMPTS) -> "RoutedStream":
        """The response chunks of ``request`` from a chosen executor (``.node`` says which,
        once the first chunk arrived); executors failing before the first chunk are replaced,
        ``attempts`` executors at most."""
        return RoutedStream(self, model, request, selector, timeout, attempts)

    def executor_stub(self, address: str) -> executor_pb2_grpc.ExecutorServiceStub:
        return executor_pb2_grpc.ExecutorServiceStub(self._channel(address))

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _listed(self, model: str, selector: str) -> tuple[list[fpb.FleetNode], list[str]]:
        key = (model, selector)
        with self._lock:
            cached = self._cache.get(key)
        if cached and self._clock() - cached[0] < CANDIDATES_TTL_S:
            return cached[1], cached[2]
        wanted = parse_selector(",".join(filter(None, [f"model={model}", selector])))
        try:
            nodes, unreachable = list_nodes(self._fleet(), str(wanted), ppb.STATUS_VIEW_BRIEF, connected_only=True)
        except grpc.RpcError as error:
            raise Unavailable(f"the control node at {self.fleet_address} did not answer: "
                              f"{error.code().name}: {error.details()}") from None
        # Filtered here too: a control node that ignores the selector still routes right.
        nodes = [n for n in nodes if n.status.connected and n.status.executor_address
                 and wanted.matches(n.status.labels)]
        with self._lock:
            self._cache[key] = (self._clock(), nodes, unreachable)
        return nodes, unreachable

    def _none_message(self, model: str, selector: str, unreachable: list[str]) -> str:
        try:
            connected, _ = list_nodes(self._fleet(), view=ppb.STATUS_VIEW_BRIEF, connected_only=True)
        except grpc.RpcError:
            connected = []
        models = sorted({n.status.labels.get("model", "(unlabelled)") for n in connected if n.status.connected})
        serving = [n for n in connected if n.status.labels.get("model") == model]
        message = f"no connected executor serves model {model!r}" + (f" with {selector}" if selector else "")
        if serving and not any(n.status.executor_address for n in serving):
            message += f" at an address clients can reach ({len(serving)} registered none)"
        message += f" (labels seen: {', '.join(f'model={m}' for m in models)})" if models \
            else " (no executor is connected)"
        if unreachable:
            message += f"; planners not answering: {', '.join(unreachable)}"
        return message

    def _by_load(self, nodes: list[fpb.FleetNode]) -> list[fpb.FleetNode]:
        with self._lock:
            mine = dict(self._open_streams)

        def load(node):
            t = node.status.throughput
            return (t.running + t.queue_depth + mine.get(node.status.executor_address, 0), t.tokens_per_second > 0,
                    self._rng.random())

        return sorted(nodes, key=load)

    def _recently_failed(self, address: str) -> bool:
        with self._lock:
            failed = self._failed.get(address)
            if failed is not None and self._clock() - failed >= FAILURE_MEMORY_S:
                del self._failed[address]
                failed = None
        return failed is not None

    def _healthy(self, address: str) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = self._open(address)
            return self._channels[address]

    def _fleet(self) -> fleet_pb2_grpc.FleetServiceStub:
        return fleet_pb2_grpc.FleetServiceStub(self._channel(self.fleet_address))

    def _count_stream(self, address: str, delta: int) -> None:
        with self._lock:
            self._open_streams[address] += delta
            if self._open_streams[address] <= 0:
                del self._open_streams[address]


class RoutedStream:
    """An iterator over GenerateResponse chunks from the executor a Router chose; ``node`` is
    that executor once its first chunk arrived. ``cancel()`` ends the stream."""

    def __init__(self, router: Router, model: str, request: epb.GenerateRequest, selector: str, timeout: float,
                 attempts: int):
        self.node: fpb.FleetNode | None = None
        self._call = None
        self._chunks = self._run(router, model, request, selector, timeout, attempts)

    def __iter__(self) -> Iterator[epb.GenerateResponse]:
        return self

    def __next__(self) -> epb.GenerateResponse:
        return next(self._chunks)

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def _run(self, router, model, request, selector, timeout, attempts) -> Iterator[epb.GenerateResponse]:
        tried: set[str] = set()
        errors = []
        while len(tried) < attempts:
            try:
                node = router.pick(model, selector, exclude=tried)
            except Unavailable:
                if not errors:
                    raise
                break
            address = node.status.executor_address
            tried.add(address)
            router._count_stream(address, +1)
            try:
                self._call = router.executor_stub(address).Generate(request, timeout=timeout)
                try:
                    first = next(self._call, None)
                except grpc.RpcError as error:
                    if error.code() not in _RETRIED:
                        raise
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        router.mark_failed(address)
                    errors.append(f"{node.status.node_id} ({address}): {error.code().name}: {error.details()}")
                    continue
                self.node = node
                if first is not None:
                    yield first
                    yield from self._call
                return
            finally:
                router._count_stream(address, -1)
        raise Unavailable(f"no executor serving model {model!r} took the request after {len(tried)} tries: "
                          + "; ".join(errors))
