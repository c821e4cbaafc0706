"""PlannerService over grpc.aio: executors dial in and keep one Connect stream each.

A stream is a coroutine on the server's event loop, not a thread: an idle executor costs a
suspended coroutine and its outbox, which wakes the loop when the registry (on any thread)
has something to send. Messages from executors are checked on the loop and handed to the
registry, whose lock is held for microseconds; control calls (status pages, pushes,
profiles) run on the loop's thread pool, so neither they nor health checks wait behind the
streams. Besides plans, the stream carries profiles: ``ProfileExecutor`` sends a
ProfileRequest down a connected executor's stream and waits for its answer, so a device
behind NAT can be profiled through the connection it opened itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import grpc

from swapmoe.core.errors import Busy, InvalidField
from swapmoe.core.labels import check_page_size, page_after, page_token, parse_selector
from swapmoe.core.limits import (MAX_BYTES, MAX_REASON_CHARS, check_count, check_node_id, check_node_ids, check_range,
                                 check_text)
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.outbox import Ended
from swapmoe.planner_service.planner import Planner, PlannerSettings
from swapmoe.planner_service.registration import check_budget_change, check_registration, check_result
from swapmoe.planner_service.records import ExecutorRecord, PendingProfile
from swapmoe.planner_service.registry import PUSH_CHUNK, Registry
from swapmoe.planner_service.state import PlannerState
from swapmoe.rpc import convert
from swapmoe.rpc.aio_server import AioServer, run_blocking, start_aio_server
from swapmoe.rpc.security import ServerSecurity
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PlannerService"].full_name
UPSTREAM_TELEMETRY_MS = 1000
# Memory for status, throughput for the last measured figures, experts to recognise the workload.
UPSTREAM_TOPICS = [tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EXPERTS]
STATUS_TOPICS = UPSTREAM_TOPICS[:2]
# Connect streams served at once; more get RESOURCE_EXHAUSTED. Each costs ~45 KiB of planner memory
# (benchmarks/RESULTS-fleet.md) and the file descriptors of its connection.
MAX_EXECUTORS = 20_000
DEFAULT_PROFILE_TIMEOUT_S = 600
MAX_PROFILE_TIMEOUT_S = 3600
STATE_WRITE_BEHIND_S = 0.2
# Threads for registrations, status pages and pushes: few, so that they leave the event loop
# (which serves the streams and health) its share of the interpreter.
POOL_THREADS = 4
STATUS_CHUNK = 256
# An executor's failed profile keeps its status when it is one the caller can act on.
_RELAYED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS}


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, registry: Registry | None = None, max_executors: int = MAX_EXECUTORS):
        self.registry = registry or Registry()
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
            # Checks and registration off the loop (they parse a layout, read profiles, take the lock).
            record, secret = await run_blocking(lambda: self.registry.connect(check_registration(first.registration)))
            record.outbox.bind(asyncio.get_running_loop())
            log.info("executor %s connected", record.node_id)
            reader = asyncio.create_task(self._read(record, request_iterator))
            # Expert reports only from executors whose workload can be recognised: a third of the
            # messages a fleet of an unprofiled model would otherwise send for nothing.
            topics = UPSTREAM_TOPICS if self.registry.planner.recognises_workloads(record.node_id) else STATUS_TOPICS
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
            self.registry.on_budget_change(record, message.budget_change)
        elif kind == "telemetry":
            self.registry.on_telemetry(record, message.telemetry)
        elif kind == "profile_result":
            check_text("profile_result.request_id", message.profile_result.request_id)
            check_text("profile_result.error", message.profile_result.error, MAX_REASON_CHARS)
            self.registry.on_profile_result(record, message.profile_result)
        elif kind == "registration":
            raise InvalidField("registration", "is sent once, as the first message of a stream")

    async def GetPlanStatus(self, request, context):
        check_node_ids("node_ids", request.node_ids)
        selector = parse_selector(request.selector)
        size = check_page_size("page_size", request.page_size)
        after = page_after("page_token", request.page_token)
        check_count("states", request.states, len(ppb.PlanState.keys()))
        records, last, summary = await run_blocking(self.registry.page, list(request.node_ids), selector, after,
                                                    size, request.connected_only, frozenset(request.states))
        statuses = await self._statuses(records, request.view)
        return ppb.PlanStatusResponse(executors=statuses, next_page_token=page_token(last) if last else "",
                                      summary=summary)

    async def PushPlan(self, request, context):
        check_node_ids("node_ids", request.node_ids)
        selector = parse_selector(request.selector)
        check_range("budget_bytes", request.budget_bytes, 0, MAX_BYTES)
        plan = None
        if request.HasField("plan"):
            plan = convert.plan_from_pb(request.plan).with_version(0).with_budget(0)  # the planner assigns versions
            for record in await run_blocking(self.registry.find, list(request.node_ids)):
                validate_plan(plan, record.layout)
        records = await run_blocking(self.registry.select, list(request.node_ids), selector)
        for start in range(0, len(records), PUSH_CHUNK):
            # One chunk at a time, back on the loop in between: each chunk's plans are on their way
            # before the next is made, so health checks and streams wait for one chunk, not the fleet.
            await run_blocking(self.registry.push_to, records[start:start + PUSH_CHUNK], plan, request.budget_bytes)
        return ppb.PushPlanResponse(executors=await self._statuses(records, request.view))

    async def _statuses(self, records: list[ExecutorRecord], view: int) -> list[ppb.ExecutorStatus]:
        """Statuses made a chunk at a time off the loop, back on it in between (10,000 of them take
        ~1 s of the interpreter: the streams and health checks get their turns meanwhile)."""
        statuses = []
        for start in range(0, len(records), STATUS_CHUNK):
            statuses += await run_blocking(self.registry.statuses, records[start:start + STATUS_CHUNK],
                                           view == ppb.STATUS_VIEW_BRIEF)
        return statuses

    async def ProfileExecutor(self, request, context):
        check_node_id("node_id", request.node_id)
        convert.check_profile_request(request.request, prefix="request.")
        check_range("timeout_s", request.timeout_s, 0, MAX_PROFILE_TIMEOUT_S)
        timeout = request.timeout_s or DEFAULT_PROFILE_TIMEOUT_S
        pending = self.registry.ask_profile(request.node_id, request.request)
        try:
            outcome = await _wait(pending, timeout, context)
        finally:
            self.registry.end_profile(pending)  # cancels it on the executor when unanswered
        if outcome.error:
            code = grpc.StatusCode.FAILED_PRECONDITION
            code = next((c for c in _RELAYED if c.value[0] == outcome.error_code), code)
            await context.abort(code, f"executor {request.node_id!r} could not profile: {outcome.error}")
        return ppb.ProfileExecutorResponse(result=outcome.result)


async def _wait(pending: PendingProfile, timeout: float, context) -> ppb.ProfileOutcome:
    """The executor's answer; aborts on a timeout or a stream that ended (a caller that leaves
    cancels this coroutine)."""
    deadline = time.monotonic() + timeout
    while not pending.done.is_set():
        if time.monotonic() >= deadline:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"executor {pending.node_id!r} did not finish profiling within {timeout:g} s")
        await asyncio.sleep(0.05)
    if pending.outcome is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, pending.failure)
    return pending.outcome


def serve(address: str = "127.0.0.1:0", registry: Registry | None = None, state_dir: Path | None = None,
          max_executors: int = MAX_EXECUTORS, settings: PlannerSettings | None = None,
          security: ServerSecurity | None = None) -> tuple[AioServer, Registry]:
    """Start PlannerService. With ``state_dir`` (and no ``registry``) every executor's plans,
    the device profiles measured and the frontiers searched are kept there (written behind,
    every 0.2 s, and at stop) and restored at start; ``settings`` say where accuracy profiles
    are and how to search. At most ``max_executors`` Connect streams at once; ``security``: TLS
    and the tokens accepted (``swapmoe.rpc.security``)."""
    on_stop = []
    if registry is None:
        settings = dataclasses.replace(settings or PlannerSettings(), state_dir=state_dir)
        planner = Planner(settings)
        state = PlannerState(state_dir, write_behind_s=STATE_WRITE_BEHIND_S) if state_dir is not None else None
        registry = Registry(state.load(), state.save, planner) if state else Registry(planner=planner)
        if state is not None:
            on_stop.append(state.close)
    servicer = PlannerServicer(registry, max_executors)
    server = start_aio_server(lambda s: planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, s),
                              [SERVICE_NAME], address, pool_threads=POOL_THREADS, security=security)
    server.on_stop.extend(on_stop)
    return server, servicer.registry
