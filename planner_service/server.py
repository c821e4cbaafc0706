"""PlannerService over gRPC: executors dial in and keep one Connect stream each."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import check_node_ids
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.registration import check_budget_change, check_registration, check_result
from swapmoe.planner_service.registry import ExecutorRecord, Registry
from swapmoe.planner_service.state import PlannerState
from swapmoe.rpc import convert, transport
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PlannerService"].full_name
UPSTREAM_TELEMETRY_MS = 1000
# Connect streams served at once (each holds a server thread and a reader thread); more get
# RESOURCE_EXHAUSTED. The fleet at scale moves past this.
MAX_EXECUTORS = 240


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
                                                         topics=[tpb.TOPIC_MEMORY], node_secret=secret))
            while context.is_active():
                try:
                    item = record.outbox.get(timeout=0.5)
                except queue.Empty:  # check the stream is still alive
                    continue
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item  # a message the reader refused: the stream ends with its status
                yield ppb.PlannerMessage(plan=convert.plan_to_pb(item))
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
        return ppb.PlanStatusResponse(executors=[r.to_pb() for r in self.registry.find(list(request.node_ids))])

    def PushPlan(self, request, context):
        check_node_ids("node_ids", request.node_ids)
        plan = None
        if request.HasField("plan"):
            plan = convert.plan_from_pb(request.plan).with_version(0)  # the planner assigns versions
            for record in self.registry.find(list(request.node_ids)):
                validate_plan(plan, record.layout)
        records = self.registry.push(list(request.node_ids), plan)
        return ppb.PushPlanResponse(executors=[r.to_pb() for r in records])


def serve(address: str = "127.0.0.1:0", registry: Registry | None = None, state_dir: Path | None = None,
          max_executors: int = MAX_EXECUTORS) -> tuple[transport.Server, Registry]:
    """Start PlannerService. With ``state_dir`` (and no ``registry``) every executor's plans are
    kept there and restored at start; ``max_executors`` Connect streams at once, each on a
    thread of its own, beside the threads left for status and push calls."""
    if registry is None:
        state = PlannerState(state_dir) if state_dir is not None else None
        registry = Registry(state.load(), state.save) if state else Registry()
    servicer = PlannerServicer(registry)
    server = transport.start_server(lambda s: planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, s),
                                    [SERVICE_NAME], address, {"Connect": max_executors}, unary_threads=16)
    return server, servicer.registry
