"""The planner's control RPCs (status pages, pushes, profiles) as blocking calls, one path for both doors.

They run on threads, never on the event loop that serves the executors' streams: on the
control server's threads (``--control-port``, a sync gRPC server whose answers do not queue
behind 10,000 streams' traffic on the loop), or on the executor server's pool when a caller
uses the executor address. Status pages and pushes go a chunk at a time, each under its own
turn of the registry lock, so the streams' messages (which take that lock on the loop) never
wait for a whole fleet.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.core.labels import check_page_size, page_after, page_token, parse_selector
from swapmoe.core.limits import MAX_BYTES, check_count, check_node_id, check_node_ids, check_range
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.records import ExecutorRecord, PendingProfile
from swapmoe.planner_service.registry import PUSH_CHUNK, Registry
from swapmoe.rpc import convert
from swapmoe.rpc.status import Abort
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc

DEFAULT_PROFILE_TIMEOUT_S = 600
MAX_PROFILE_TIMEOUT_S = 3600
STATUS_CHUNK = 256
# A status page ends early past this many bytes (and says where the next starts): executors choose
# their layouts and labels, and 500 of the largest the bounds allow would not fit one gRPC message.
MAX_PAGE_BYTES = 16 << 20
PROFILE_POLL_S = 0.05
# An executor's failed profile keeps its status when it is one the caller can act on.
_RELAYED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS}


class PlannerControl:
    def __init__(self, registry: Registry, state_health: Callable[[], tuple[int, str]] = lambda: (0, ""),
                 max_page_bytes: int = MAX_PAGE_BYTES):
        """``state_health``: records not written yet and why (``state.PlannerState.health``)."""
        self.registry = registry
        self.state_health = state_health
        self.max_page_bytes = max_page_bytes

    def plan_status(self, request: ppb.PlanStatusRequest) -> ppb.PlanStatusResponse:
        check_node_ids("node_ids", request.node_ids)
        selector = parse_selector(request.selector)
        size = check_page_size("page_size", request.page_size)
        after = page_after("page_token", request.page_token)
        check_count("states", request.states, len(ppb.PlanState.keys()))
        records, last, summary = self.registry.page(list(request.node_ids), selector, after, size,
                                                    request.connected_only, frozenset(request.states))
        statuses = self._statuses(records, request.view)
        kept = _within(statuses, self.max_page_bytes)
        if kept < len(statuses):
            statuses, last = statuses[:kept], records[kept - 1].node_id
        unsaved, error = self.state_health()
        return ppb.PlanStatusResponse(executors=statuses, next_page_token=page_token(last) if last else "",
                                      summary=summary, unsaved_records=unsaved, state_error=error)

    def forget_nodes(self, request: ppb.ForgetNodesRequest) -> ppb.ForgetNodesResponse:
        if not request.node_ids:
            raise InvalidField("node_ids", "name the executors to forget")
        check_node_ids("node_ids", request.node_ids)
        return ppb.ForgetNodesResponse(forgotten=self.registry.forget(list(request.node_ids)))

    def push_plan(self, request: ppb.PushPlanRequest) -> ppb.PushPlanResponse:
        check_node_ids("node_ids", request.node_ids)
        selector = parse_selector(request.selector)
        check_range("budget_bytes", request.budget_bytes, 0, MAX_BYTES)
        plan = None
        if request.HasField("plan"):
            plan = convert.plan_from_pb(request.plan).with_version(0).with_budget(0)  # the planner assigns versions
            for record in self.registry.find(list(request.node_ids)):
                validate_plan(plan, record.layout)
        records = self.registry.select(list(request.node_ids), selector)
        for start in range(0, len(records), PUSH_CHUNK):
            self.registry.push_to(records[start:start + PUSH_CHUNK], plan, request.budget_bytes)
        return ppb.PushPlanResponse(executors=self._statuses(records, request.view))

    def _statuses(self, records: list[ExecutorRecord], view: int) -> list[ppb.ExecutorStatus]:
        statuses = []
        for start in range(0, len(records), STATUS_CHUNK):
            statuses += self.registry.statuses(records[start:start + STATUS_CHUNK], view == ppb.STATUS_VIEW_BRIEF)
        return statuses

    def ask_profile(self, request: ppb.ProfileExecutorRequest) -> tuple[PendingProfile, float]:
        """Send the profile request down the executor's stream; the caller waits for ``done``
        (up to the returned seconds), then calls ``profile_answer``, and ``registry.end_profile``
        in any case."""
        check_node_id("node_id", request.node_id)
        convert.check_profile_request(request.request, prefix="request.")
        check_range("timeout_s", request.timeout_s, 0, MAX_PROFILE_TIMEOUT_S)
        return self.registry.ask_profile(request.node_id, request.request), request.timeout_s or DEFAULT_PROFILE_TIMEOUT_S

    @staticmethod
    def profile_answer(pending: PendingProfile, timeout: float) -> ppb.ProfileExecutorResponse:
        """The executor's result, or the status the call ends with."""
        if not pending.done.is_set():
            raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"executor {pending.node_id!r} did not finish profiling within {timeout:g} s")
        if pending.outcome is None:
            raise Abort(grpc.StatusCode.UNAVAILABLE, pending.failure)
        if pending.outcome.error:
            code = next((c for c in _RELAYED if c.value[0] == pending.outcome.error_code),
                        grpc.StatusCode.FAILED_PRECONDITION)
            raise Abort(code, f"executor {pending.node_id!r} could not profile: {pending.outcome.error}")
        return ppb.ProfileExecutorResponse(result=pending.outcome.result)

    def profile(self, request: ppb.ProfileExecutorRequest, active: Callable[[], bool]) -> ppb.ProfileExecutorResponse:
        """``ask_profile``, a blocking wait while the caller is ``active``, ``profile_answer``."""
        pending, timeout = self.ask_profile(request)
        deadline = time.monotonic() + timeout
        try:
            while not pending.done.wait(PROFILE_POLL_S) and active() and time.monotonic() < deadline:
                pass
        finally:
            self.registry.end_profile(pending)  # cancels it on the executor when unanswered
        return self.profile_answer(pending, timeout)


def _within(statuses: list[ppb.ExecutorStatus], limit: int) -> int:
    """How many of ``statuses``, from the first, fit in ``limit`` bytes (at least one)."""
    total = 0
    for kept, status in enumerate(statuses):
        total += status.ByteSize()
        if total > limit and kept:
            return kept
    return len(statuses)


class ControlServicer(planner_pb2_grpc.PlannerServiceServicer):
    """PlannerService on the control server's threads; Connect stays on the executor address."""

    def __init__(self, control: PlannerControl):
        self.control = control

    def Connect(self, request_iterator, context):
        raise Abort(grpc.StatusCode.UNIMPLEMENTED,
                    "Connect is served on the planner's executor address, not on its control port")

    def GetPlanStatus(self, request, context):
        return self.control.plan_status(request)

    def PushPlan(self, request, context):
        return self.control.push_plan(request)

    def ProfileExecutor(self, request, context):
        return self.control.profile(request, context.is_active)

    def ForgetNodes(self, request, context):
        return self.control.forget_nodes(request)
