"""The control node: fleet-wide plan rollouts across one or more planners."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from swapmoe.core.errors import NotFound
from swapmoe.core.limits import MAX_ROLLOUT_TIMEOUT_MS, check_node_ids, check_range, check_text
from swapmoe.rpc import transport
from swapmoe.v1 import fleet_pb2 as fpb, fleet_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

SERVICE_NAME = fpb.DESCRIPTOR.services_by_name["FleetService"].full_name
PLANNER_TIMEOUT_S = 10
KEPT_ROLLOUTS = 10_000  # GetRollout answers for the newest ones


@dataclass
class RolloutRecord:
    rollout_id: str
    targets: dict[str, tuple[str, int]]  # node_id -> (planner address, plan version pushed)
    started_ns: int
    timeout_ns: int


def node_state(status: ppb.ExecutorStatus, version: int) -> int:
    """Where the rollout's plan stands on one executor."""
    if status.acked_plan.version >= version:
        return ppb.PLAN_STATE_ACKED
    if status.state == ppb.PLAN_STATE_NACKED and status.last_result.plan_version >= version:
        return ppb.PLAN_STATE_NACKED
    return ppb.PLAN_STATE_PENDING


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(self, planner_addresses: list[str]):
        self._channels = {a: transport.channel(a) for a in planner_addresses}
        self._planners = {a: planner_pb2_grpc.PlannerServiceStub(c) for a, c in self._channels.items()}
        self._rollouts: dict[str, RolloutRecord] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _nodes(self) -> list[fpb.FleetNode]:
        nodes = []
        for address, planner in self._planners.items():
            response = planner.GetPlanStatus(ppb.PlanStatusRequest(), timeout=PLANNER_TIMEOUT_S)
            nodes += [fpb.FleetNode(planner=address, status=s) for s in response.executors]
        return nodes

    def ListNodes(self, request, context):
        return fpb.ListNodesResponse(nodes=self._nodes())

    def StartRollout(self, request, context):
        check_node_ids("node_ids", request.node_ids)
        check_range("timeout_ms", request.timeout_ms, 0, MAX_ROLLOUT_TIMEOUT_MS)
        nodes = {n.status.node_id: n for n in self._nodes()}
        wanted = list(request.node_ids) or [n for n, node in nodes.items() if node.status.connected]
        missing = [n for n in wanted if n not in nodes]
        if missing:
            raise NotFound(f"node_ids: unknown executors {missing}")
        if not wanted:
            raise NotFound("node_ids: no connected executors to roll out to")
        targets = {}
        for address in {nodes[n].planner for n in wanted}:
            push = ppb.PushPlanRequest(node_ids=[n for n in wanted if nodes[n].planner == address])
            if request.HasField("plan"):
                push.plan.CopyFrom(request.plan)
            response = self._planners[address].PushPlan(push, timeout=PLANNER_TIMEOUT_S)
            targets |= {s.node_id: (address, s.desired_plan.version) for s in response.executors}
        with self._lock:
            rollout_id = f"rollout-{next(self._ids)}"
            record = RolloutRecord(rollout_id, targets, time.time_ns(), (request.timeout_ms or 30_000) * 1_000_000)
            self._rollouts[rollout_id] = record
            while len(self._rollouts) > KEPT_ROLLOUTS:  # the oldest go first (dicts keep insertion order)
                del self._rollouts[next(iter(self._rollouts))]
        return self._view(record)

    def GetRollout(self, request, context):
        check_text("rollout_id", request.rollout_id)
        with self._lock:
            record = self._rollouts.get(request.rollout_id)
        if record is None:
            raise NotFound(f"rollout_id: no rollout {request.rollout_id!r}")
        return self._view(record)

    def _view(self, record: RolloutRecord) -> fpb.Rollout:
        statuses = {n.status.node_id: n for n in self._nodes()}
        rollout = fpb.Rollout(rollout_id=record.rollout_id, started_ns=record.started_ns)
        counts = {ppb.PLAN_STATE_ACKED: 0, ppb.PLAN_STATE_NACKED: 0, ppb.PLAN_STATE_PENDING: 0}
        for node_id, (address, version) in sorted(record.targets.items()):
            node = statuses.get(node_id) or fpb.FleetNode(planner=address, status=ppb.ExecutorStatus(node_id=node_id))
            counts[node_state(node.status, version)] += 1
            rollout.nodes.append(node)
        rollout.acked, rollout.nacked, rollout.pending = (counts[ppb.PLAN_STATE_ACKED],
                                                          counts[ppb.PLAN_STATE_NACKED],
                                                          counts[ppb.PLAN_STATE_PENDING])
        timed_out = time.time_ns() - record.started_ns > record.timeout_ns
        if rollout.nacked or (rollout.pending and timed_out):
            rollout.state = fpb.ROLLOUT_STATE_FAILED
        elif rollout.pending:
            rollout.state = fpb.ROLLOUT_STATE_IN_PROGRESS
        else:
            rollout.state = fpb.ROLLOUT_STATE_SUCCEEDED
        return rollout

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def serve(planner_addresses: list[str], address: str = "127.0.0.1:0") -> transport.Server:
    servicer = FleetServicer(planner_addresses)
    return transport.start_server(lambda s: fleet_pb2_grpc.add_FleetServiceServicer_to_server(servicer, s),
                            [SERVICE_NAME], address, unary_threads=16)
