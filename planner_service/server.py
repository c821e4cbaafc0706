"""PlannerService over gRPC: executors dial in and keep one Connect stream each.

Besides plans, the stream carries profiles: ``ProfileExecutor`` sends a ProfileRequest down a
connected executor's stream and waits (outside the registry's lock) for its answer, so a
device behind NAT can be profiled through the connection it opened itself.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_REASON_CHARS, check_node_id, check_node_ids, check_range, check_text
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.planner import Planner, PlannerSettings
from swapmoe.planner_service.registration import check_budget_change, check_registration, check_result
from swapmoe.planner_service.registry import ExecutorRecord, PendingProfile, Registry
from swapmoe.planner_service.state import PlannerState
from swapmoe.rpc import convert, transport
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PlannerService"].full_name
UPSTREAM_TELEMETRY_MS = 1000
# Memory for status, throughput for the last measured figures, experts to recognise the workload.
UPSTREAM_TOPICS = [tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EXPERTS]
# Connect streams served at once (each holds a server thread and a reader thread); more get
# RESOURCE_EXHAUSTED. The fleet at scale moves past this.
MAX_EXECUTORS = 240
DEFAULT_PROFILE_TIMEOUT_S = 600
MAX_PROFILE_TIMEOUT_S = 3600
# An executor's failed profile keeps its status when it is one the caller can act on.
_RELAYED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS}


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, registry: Registry | None = None):
        self.registry = registry or Registry()

    def Connect(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("message") != "registration":
            raise InvalidField("registration", "the first message on a Connect stream must be a registration")
        record, secret = self.registry.connect(check_registration(first.registration))
        log.info("executor %s connected", record.node_id)
        reader = threading.Thread(target=self._read, args=(record, request_iterator), daemon=True,
                                  name=f"planner-read-{record.node_id}")
        reader.start()
        try:
            yield ppb.PlannerMessage(welcome=ppb.Welcome(telemetry_interval_ms=UPSTREAM_TELEMETRY_MS,
                                                         topics=UPSTREAM_TOPICS, node_secret=secret))
            while context.is_active():
                try:
                    item = record.outbox.get(timeout=0.5)
                except queue.Empty:  # check the stream is still alive
                    continue
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item  # a message the reader refused: the stream ends with its status
                yield item if isinstance(item, ppb.PlannerMessage) else ppb.PlannerMessage(plan=convert.plan_to_pb(item))
        finally:
            self.registry.disconnect(record)
            log.info("executor %s disconnected", record.node_id)

    def _read(self, record: ExecutorRecord, request_iterator) -> None:
        """Each message is checked before the registry sees it; a bad one ends the stream."""
        try:
            for message in request_iterator:
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
        except InvalidField as error:
            log.warning("executor %s sent a bad message: %s", record.node_id, error)
            record.outbox.put(error)
            return
        except Exception as error:  # noqa: BLE001 - the stream ended; the writer notices
            log.debug("stream of %s ended: %s", record.node_id, error)
        record.outbox.put(None)

    def GetPlanStatus(self, request, context):
        check_node_ids("node_ids", request.node_ids)
        return ppb.PlanStatusResponse(executors=self.registry.statuses(self.registry.find(list(request.node_ids))))

    def PushPlan(self, request, context):
        check_node_ids("node_ids", request.node_ids)
        plan = None
        if request.HasField("plan"):
            plan = convert.plan_from_pb(request.plan).with_version(0)  # the planner assigns versions
            for record in self.registry.find(list(request.node_ids)):
                validate_plan(plan, record.layout)
        records = self.registry.push(list(request.node_ids), plan)
        return ppb.PushPlanResponse(executors=self.registry.statuses(records))


    def ProfileExecutor(self, request, context):
        check_node_id("node_id", request.node_id)
        convert.check_profile_request(request.request, prefix="request.")
        check_range("timeout_s", request.timeout_s, 0, MAX_PROFILE_TIMEOUT_S)
        timeout = request.timeout_s or DEFAULT_PROFILE_TIMEOUT_S
        pending = self.registry.ask_profile(request.node_id, request.request)
        try:
            outcome = _wait(pending, timeout, context)
        finally:
            self.registry.end_profile(pending)  # cancels it on the executor when unanswered
        if outcome.error:
            code = grpc.StatusCode.FAILED_PRECONDITION
            code = next((c for c in _RELAYED if c.value[0] == outcome.error_code), code)
            context.abort(code, f"executor {request.node_id!r} could not profile: {outcome.error}")
        return ppb.ProfileExecutorResponse(result=outcome.result)


def _wait(pending: PendingProfile, timeout: float, context) -> ppb.ProfileOutcome:
    """The executor's answer; aborts on a timeout, a stream that ended, or a caller gone."""
    deadline = time.monotonic() + timeout
    while not pending.done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
        if not context.is_active():
            context.abort(grpc.StatusCode.CANCELLED, "the caller left")
        if time.monotonic() >= deadline:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"executor {pending.node_id!r} did not finish profiling within {timeout:g} s")
    if pending.outcome is None:
        context.abort(grpc.StatusCode.UNAVAILABLE, pending.failure)
    return pending.outcome


def serve(address: str = "127.0.0.1:0", registry: Registry | None = None, state_dir: Path | None = None,
          max_executors: int = MAX_EXECUTORS, settings: PlannerSettings | None = None) -> tuple[transport.Server, Registry]:
    """Start PlannerService. With ``state_dir`` (and no ``registry``) every executor's plans,
    the device profiles measured and the frontiers searched are kept there and restored at
    start; ``settings`` say where accuracy profiles are and how to search.
    ``max_executors`` Connect streams at once, each on a thread of its own, beside the threads
    left for status and push calls."""
    if registry is None:
        settings = dataclasses.replace(settings or PlannerSettings(), state_dir=state_dir)
        planner = Planner(settings)
        state = PlannerState(state_dir) if state_dir is not None else None
        registry = Registry(state.load(), state.save, planner) if state else Registry(planner=planner)
    servicer = PlannerServicer(registry)
    server = transport.start_server(lambda s: planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, s),
                                    [SERVICE_NAME], address, {"Connect": max_executors}, unary_threads=16)
    return server, servicer.registry
