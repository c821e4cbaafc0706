"""What the planner knows about each executor, and which plan each should run.

Plain bookkeeping under one lock: the gRPC server feeds it messages from the
executors' streams and drains each executor's outbox into its stream.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from swapmoe.core.errors import NotFound
from swapmoe.core.plan import Plan
from swapmoe.planner_service.planning import plan_for
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, planner_pb2 as ppb


@dataclass
class ExecutorRecord:
    node_id: str
    registration: ppb.Registration
    connected: bool = True
    desired: Plan | None = None
    acked: Plan | None = None
    state: int = ppb.PLAN_STATE_UNSPECIFIED
    last_result: common_pb2.PlanResult | None = None
    memory: common_pb2.MemoryReport | None = None
    last_seen_ns: int = 0
    version: int = 0  # highest plan version this executor has seen
    outbox: queue.Queue = field(default_factory=queue.Queue)

    @property
    def layout(self):
        return convert.layout_from_pb(self.registration.layout)

    def to_pb(self) -> ppb.ExecutorStatus:
        reg = self.registration
        msg = ppb.ExecutorStatus(node_id=self.node_id, connected=self.connected, budget_bytes=reg.budget_bytes,
                                 layout=reg.layout, device=reg.device, state=self.state,
                                 last_seen_ns=self.last_seen_ns)
        if self.desired:
            msg.desired_plan.CopyFrom(convert.plan_to_pb(self.desired))
        if self.acked:
            msg.acked_plan.CopyFrom(convert.plan_to_pb(self.acked))
        if self.last_result:
            msg.last_result.CopyFrom(self.last_result)
        if self.memory:
            msg.memory.CopyFrom(self.memory)
        return msg


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[str, ExecutorRecord] = {}

    def connect(self, registration: ppb.Registration) -> ExecutorRecord:
        """Register (or resync) an executor; queues the plan it should run if it runs another."""
        current = convert.plan_from_pb(registration.current_plan)
        with self._lock:
            old = self._records.get(registration.node_id)
            if old is not None:
                old.outbox.put(None)  # ends a lingering stream of the same executor
            record = ExecutorRecord(registration.node_id, registration, last_seen_ns=time.time_ns())
            record.version = max(current.version, old.version if old else 0)
            if current.version:  # resync: the planner learns what the executor runs
                record.acked = record.desired = current
                record.state = ppb.PLAN_STATE_ACKED
            if old and old.desired and old.desired.version > current.version and old.state != ppb.PLAN_STATE_NACKED:
                self._send(record, old.desired)  # the executor missed it while away
            else:
                self._replan(record)
            self._records[record.node_id] = record
            return record

    def disconnect(self, record: ExecutorRecord) -> None:
        with self._lock:
            if self._records.get(record.node_id) is record:
                record.connected = False

    def seen(self, record: ExecutorRecord) -> None:
        record.last_seen_ns = time.time_ns()

    def on_result(self, record: ExecutorRecord, result: common_pb2.PlanResult) -> None:
        with self._lock:
            record.last_result = result
            if record.desired and result.plan_version == record.desired.version:
                record.state = ppb.PLAN_STATE_ACKED if result.accepted else ppb.PLAN_STATE_NACKED
                if result.accepted:
                    record.acked = record.desired
            if result.HasField("memory"):
                record.memory = result.memory

    def on_budget_change(self, record: ExecutorRecord, change: ppb.BudgetChange) -> None:
        """The device changed its budget: plan again for the new one."""
        with self._lock:
            record.registration.budget_bytes = change.budget_bytes
            self._replan(record)

    def on_telemetry(self, record: ExecutorRecord, event) -> None:
        if event.WhichOneof("payload") == "memory":
            with self._lock:
                record.memory = event.memory

    def push(self, node_ids: list[str], plan: Plan | None) -> list[ExecutorRecord]:
        """Send ``plan`` (or a computed one) to the named executors (all connected ones if none named)."""
        with self._lock:
            targets = self._targets(node_ids) if node_ids else [r for r in self._records.values() if r.connected]
            for record in targets:
                if plan is None:
                    self._replan(record, force=True)
                else:
                    self._send(record, plan.with_version(record.version + 1))
            return targets

    def find(self, node_ids: list[str]) -> list[ExecutorRecord]:
        with self._lock:
            return self._targets(node_ids) if node_ids else list(self._records.values())

    # callers hold the lock
    def _targets(self, node_ids: list[str]) -> list[ExecutorRecord]:
        missing = [n for n in node_ids if n not in self._records]
        if missing:
            raise NotFound(f"node_ids: unknown executors {missing}")
        return [self._records[n] for n in node_ids]

    def _replan(self, record: ExecutorRecord, force: bool = False) -> None:
        reg = record.registration
        plan = plan_for(record.layout, convert.reserve_from_pb(reg.reserve), reg.budget_bytes, record.version + 1)
        running = record.desired if record.state == ppb.PLAN_STATE_PENDING else record.acked
        if force or running is None or running.experts_per_layer != plan.experts_per_layer:
            self._send(record, plan)

    def _send(self, record: ExecutorRecord, plan: Plan) -> None:
        record.desired, record.state = plan, ppb.PLAN_STATE_PENDING
        record.version = max(record.version, plan.version)
        record.outbox.put(plan)
