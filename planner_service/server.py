"""PlannerService over grpc.aio: executors dial in and keep one Connect stream each.

A stream is a coroutine on the server's event loop, not a thread: an idle executor costs a
suspended coroutine and its outbox, which wakes the loop when the registry (on any thread)
has something to send. Messages from executors are checked on the loop and handed to the
registry, whose lock is held for microseconds; control calls (status pages, pushes,
profiles: ``planner_service.control``) run on the loop's thread pool. A call on the loop
still takes several of its turns, and with 10,000 streams a turn can take 50-200 ms during a
registration storm or a fleet-wide push, so the control RPCs and health are also served on a
sync server's threads (``control_address``), which answer within tens of ms throughout
(benchmarks/results/RESULTS-fleet.md). Besides plans, the stream carries profiles: ``ProfileExecutor`` sends a
ProfileRequest down a connected executor's stream and waits for its answer, so a device
behind NAT can be profiled through the connection it opened itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import grpc

from swapmoe.core.errors import Busy, InvalidField
from swapmoe.core.limits import MAX_REASON_CHARS, check_text
from swapmoe.planner_service.outbox import Ended
from swapmoe.planner_service.policy import RESCAN_S, PlannerSettings
from swapmoe.planner_service.registration import (Peer, check_budget_change, check_registration, check_result,
                                                   published_address)
from swapmoe.planner_service.control import PROFILE_POLL_S, ControlServicer, PlannerControl
from swapmoe.planner_service.heap import HeapKeeper, HeapSettings
from swapmoe.planner_service.records import ExecutorRecord
from swapmoe.planner_service.claims import RegistrySettings
from swapmoe.planner_service.registry import Registry
from swapmoe.planner_service.state import PlannerState
from swapmoe.rpc import convert
from swapmoe.rpc.aio_server import AioServer, run_blocking, start_aio_server
from swapmoe.rpc.security import ServerSecurity
from swapmoe.rpc.status import Abort
from swapmoe.rpc.transport import start_server
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PlannerService"].full_name
UPSTREAM_TELEMETRY_MS = 1000
# Memory for status, throughput for the last measured figures, experts to recognise the workload.
UPSTREAM_TOPICS = [tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EXPERTS]
STATUS_TOPICS = UPSTREAM_TOPICS[:2]
# Connect streams served at once; more get RESOURCE_EXHAUSTED. Each costs ~45 KiB of planner memory
# (benchmarks/results/RESULTS-fleet.md) and the file descriptors of its connection.
MAX_EXECUTORS = 20_000
STATE_WRITE_BEHIND_S = 0.2
# Threads for registrations, status pages and pushes: few, so that they leave the event loop
# (which serves the streams and health) its share of the interpreter.
POOL_THREADS = 4
CONTROL_THREADS = 4
EXPIRE_EVERY_S = 60.0  # how often records of executors away past their lifetime are looked for


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, registry: Registry | None = None, max_executors: int = MAX_EXECUTORS,
                 state_health: Callable[[], tuple[int, str]] = lambda: (0, "")):
        self.registry = registry or Registry()
        self.control = PlannerControl(self.registry, state_health)
        self.max_executors = max_executors
        self.open_streams = 0  # changed on the loop only

    async def Connect(self, request_iterator, context):
        if self.open_streams >= self.max_executors:
            raise Busy(f"{self.max_executors} Connect streams are open, the most this planner serves at once; "
                       f"retry later or connect to another planner")
        self.open_streams += 1
        record = reader = None
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("message") != "registration":
                raise InvalidField("registration", "the first message on a Connect stream must be a registration")
            peer = Peer.from_grpc(context.peer(), context.auth_context())
            # Checks and registration off the loop (they parse a layout, read profiles, take the lock).
            record, secret = await run_blocking(self._register, first.registration, peer)
            record.outbox.bind(asyncio.get_running_loop())
            log.info("executor %s connected", record.node_id)
            reader = asyncio.create_task(self._read(record, request_iterator))
            # Expert reports only from executors whose workload can be recognised: a third of the
            # messages a fleet of an unprofiled model would otherwise send for nothing.
            topics = UPSTREAM_TOPICS if self.registry.policy.recognises_workloads(record.node_id) else STATUS_TOPICS
            yield ppb.PlannerMessage(welcome=ppb.Welcome(telemetry_interval_ms=UPSTREAM_TELEMETRY_MS,
                                                         topics=topics, node_secret=secret))
            while True:
                try:
                    item = await record.outbox.get()
                except Ended as end:
                    if end.error is not None:
                        raise end.error  # a message the reader refused: the stream ends with its status
                    return
                yield item if isinstance(item, ppb.PlannerMessage) else ppb.PlannerMessage(plan=convert.plan_to_pb(item))
        finally:
            self.open_streams -= 1
            if reader is not None:
                reader.cancel()
            if record is not None:
                self.registry.disconnect(record)
                log.info("executor %s disconnected", record.node_id)

    def end_streams(self) -> None:
        """The planner is stopping: end every Connect stream now with UNAVAILABLE (its executor keeps
        its plan and reconnects with backoff) instead of holding the stop for its whole grace."""
        for record in self.registry.find([]):
            if record.connected:
                record.outbox.close(Abort(grpc.StatusCode.UNAVAILABLE, "the planner is stopping; reconnect later"))

    def _register(self, registration: ppb.Registration, peer: Peer) -> tuple[ExecutorRecord, str]:
        registered = check_registration(registration)
        address, unverified = published_address(registration.executor_address, peer)
        if unverified:
            log.warning("executor %s: its address %s is not published: %s", registration.node_id,
                        registration.executor_address, unverified)
        return self.registry.connect(registered, address)

    async def _read(self, record: ExecutorRecord, request_iterator) -> None:
        """Each message is checked before the registry sees it; a bad one ends the stream."""
        try:
            async for message in request_iterator:
                self._handle(record, message)
        except InvalidField as error:
            log.warning("executor %s sent a bad message: %s", record.node_id, error)
            record.outbox.close(error)
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the stream ended; the writer notices
            log.debug("stream of %s ended: %s", record.node_id, error)
        record.outbox.close()

    def _handle(self, record: ExecutorRecord, message: ppb.ExecutorMessage) -> None:
        self.registry.seen(record)
        kind = message.WhichOneof("message")
        if kind == "plan_result":
            check_result(message.plan_result)
            self.registry.on_result(record, message.plan_result)
        elif kind == "budget_change":
            check_budget_change(record.memory_model, message.budget_change)
            self.registry.on_budget_change(record, convert.budget_change_from_pb(message.budget_change))
        elif kind == "telemetry":
            self.registry.on_telemetry(record, message.telemetry)
        elif kind == "profile_result":
            check_text("profile_result.request_id", message.profile_result.request_id)
            check_text("profile_result.error", message.profile_result.error, MAX_REASON_CHARS)
            self.registry.on_profile_result(record, message.profile_result)
        elif kind == "registration":
            raise InvalidField("registration", "is sent once, as the first message of a stream")

    async def GetPlanStatus(self, request, context):
        return await run_blocking(self.control.plan_status, request)

    async def PushPlan(self, request, context):
        return await run_blocking(self.control.push_plan, request)

    async def ProfileExecutor(self, request, context):
        pending, timeout = await run_blocking(self.control.ask_profile, request)
        deadline = time.monotonic() + timeout
        try:  # waited for on the loop, not a thread: a caller that leaves cancels this coroutine
            while not pending.done.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(PROFILE_POLL_S)
        finally:
            self.registry.end_profile(pending)  # cancels it on the executor when unanswered
        return self.control.profile_answer(pending, timeout)

    async def ForgetNodes(self, request, context):
        return await run_blocking(self.control.forget_nodes, request)


def serve(address: str = "127.0.0.1:0", registry: Registry | None = None, state_dir: Path | None = None,
          max_executors: int = MAX_EXECUTORS, settings: PlannerSettings | None = None,
          security: ServerSecurity | None = None, control_address: str | None = None,
          heap: HeapSettings | None = None,
          records: RegistrySettings = RegistrySettings()) -> tuple[AioServer, Registry]:
    """Start PlannerService. With ``state_dir`` (and no ``registry``) every executor's plans,
    the device profiles measured and the frontiers searched are kept there (written behind,
    every 0.2 s, and at stop) and restored at start; ``settings`` say where accuracy profiles
    are and how to search. At most ``max_executors`` Connect streams at once; ``security``: TLS
    and the tokens accepted (``swapmoe.rpc.security``). ``control_address``: also serve the
    control RPCs and health on a sync server's threads there (its port is the returned server's
    ``control_port``), answered at once however busy the streams keep the loop. ``heap``: keep
    the garbage collector's pauses short (``planner_service.heap``; it acts on the whole process,
    so for a process that is mainly this planner). ``records``: how many executors are kept, and
    how long one that went away is remembered."""
    on_stop = []
    state = None
    if registry is None:
        settings = dataclasses.replace(settings or PlannerSettings(), state_dir=state_dir)
        state = PlannerState(state_dir, write_behind_s=STATE_WRITE_BEHIND_S) if state_dir is not None else None
        registry = (Registry(state.load(), state.save, settings, records, state.erase) if state
                    else Registry(planning=settings, settings=records))
        if state is not None:
            on_stop.append(state.close)
    servicer = PlannerServicer(registry, max_executors, state.health if state else lambda: (0, ""))
    stop_expiring = threading.Event()
    threading.Thread(target=_expire_every, args=(registry, stop_expiring), daemon=True, name="planner-expiry").start()
    on_stop.insert(0, stop_expiring.set)
    server = start_aio_server(lambda s: planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, s),
                              [SERVICE_NAME], address, pool_threads=POOL_THREADS, security=security)
    server.control_port = None
    if control_address is not None:
        control = start_server(
            lambda s: planner_pb2_grpc.add_PlannerServiceServicer_to_server(ControlServicer(servicer.control), s),
            [SERVICE_NAME], control_address, unary_threads=CONTROL_THREADS, security=security)
        server.control_port = control.port
        server.on_stop.insert(0, lambda: control.stop(0))
    if heap is not None:
        server.on_stop.append(HeapKeeper(heap).start().stop)
    server.on_stopping.append(servicer.end_streams)
    server.on_stop.extend(on_stop)
    return server, servicer.registry


def _expire_every(registry: Registry, stop: threading.Event) -> None:
    """Until ``stop``: every ``RESCAN_S``, pick up accuracy profiles written for connected
    executors' models; every ``EXPIRE_EVERY_S``, forget executors away past their lifetime."""
    expired_at = time.monotonic()
    while not stop.wait(RESCAN_S):
        try:
            picked = registry.policy.revisit()
        except Exception:  # noqa: BLE001 - a bad profile must not end expiry too
            log.exception("looking for new accuracy profiles failed")
            picked = []
        if picked:
            log.info("an accuracy profile appeared for %d connected executors: %s", len(picked), ", ".join(picked[:10]))
        if time.monotonic() - expired_at < EXPIRE_EVERY_S:
            continue
        expired_at = time.monotonic()
        gone = registry.expire()
        if gone:
            log.info("forgot %d executors away past their lifetime: %s", len(gone), ", ".join(gone[:10]))
