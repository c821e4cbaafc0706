"""PlannerService over gRPC: executors dial in and keep one Connect stream each."""

from __future__ import annotations

import logging
import queue
import threading

from swapmoe.core.errors import InvalidField
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.registry import ExecutorRecord, Registry
from swapmoe.rpc import convert, transport
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["PlannerService"].full_name
UPSTREAM_TELEMETRY_MS = 1000


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, registry: Registry | None = None):
        self.registry = registry or Registry()

    def Connect(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("message") != "registration":
            raise InvalidField("registration", "the first message on a Connect stream must be a registration")
        if not first.registration.node_id:
            raise InvalidField("registration.node_id", "is empty")
        record = self.registry.connect(first.registration)
        log.info("executor %s connected", record.node_id)
        reader = threading.Thread(target=self._read, args=(record, request_iterator), daemon=True,
                                  name=f"planner-read-{record.node_id}")
        reader.start()
        try:
            yield ppb.PlannerMessage(welcome=ppb.Welcome(telemetry_interval_ms=UPSTREAM_TELEMETRY_MS,
                                                         topics=[tpb.TOPIC_MEMORY]))
            while context.is_active():
                try:
                    plan = record.outbox.get(timeout=0.5)
                except queue.Empty:  # check the stream is still alive
                    continue
                if plan is None:
                    return
                yield ppb.PlannerMessage(plan=convert.plan_to_pb(plan))
        finally:
            self.registry.disconnect(record)
            log.info("executor %s disconnected", record.node_id)

    def _read(self, record: ExecutorRecord, request_iterator) -> None:
        try:
            for message in request_iterator:
                self.registry.seen(record)
                kind = message.WhichOneof("message")
                if kind == "plan_result":
                    self.registry.on_result(record, message.plan_result)
                elif kind == "budget_change":
                    self.registry.on_budget_change(record, message.budget_change)
                elif kind == "telemetry":
                    self.registry.on_telemetry(record, message.telemetry)
        except Exception as error:  # noqa: BLE001 - the stream ended; the writer notices
            log.debug("stream of %s ended: %s", record.node_id, error)
        finally:
            record.outbox.put(None)

    def GetPlanStatus(self, request, context):
        return ppb.PlanStatusResponse(executors=[r.to_pb() for r in self.registry.find(list(request.node_ids))])

    def PushPlan(self, request, context):
        plan = None
        if request.HasField("plan"):
            plan = convert.plan_from_pb(request.plan)
            for record in self.registry.find(list(request.node_ids)):
                validate_plan(plan, record.layout)
        records = self.registry.push(list(request.node_ids), plan)
        return ppb.PushPlanResponse(executors=[r.to_pb() for r in records])


def serve(address: str = "127.0.0.1:0", registry: Registry | None = None) -> tuple[transport.Server, Registry]:
    servicer = PlannerServicer(registry)
    server = transport.start_server(lambda s: planner_pb2_grpc.add_PlannerServiceServicer_to_server(servicer, s),
                              [SERVICE_NAME], address, max_workers=256)
    return server, servicer.registry
