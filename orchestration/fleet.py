"""The control node: staged, fleet-wide rollouts across one or more planners.

``FleetService`` handlers are translators: a listing is fanned out to the planners
(``planners``), a rollout is planned by ``rollouts`` (pure policy), driven wave by wave by a
``RolloutDriver`` thread and kept on disk by ``RolloutStore`` (with ``state_dir``), so a restart
resumes every rollout that was under way. A node belongs to at most one active rollout: two
rollouts racing on one executor would roll each other back.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from swapmoe.core.errors import Busy, NotFound
from swapmoe.core.labels import check_page_size, page_after, page_token
from swapmoe.core.limits import MAX_REASON_CHARS, check_text
from swapmoe.orchestration import rollouts as ro
from swapmoe.orchestration.planners import Planners, describe_error, list_nodes
from swapmoe.orchestration.rollout_driver import RolloutDriver
from swapmoe.orchestration.rollout_store import RolloutStore, to_json
from swapmoe.rpc import transport
from swapmoe.v1 import fleet_pb2 as fpb, fleet_pb2_grpc, planner_pb2 as ppb

SERVICE_NAME = fpb.DESCRIPTOR.services_by_name["FleetService"].full_name
DEFAULT_ROLLOUT_PAGE = 100
MAX_ACTIVE_ROLLOUTS = 32
KEPT_ROLLOUTS = 1_000  # finished rollouts past this are forgotten, oldest first


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(self, planner_addresses: list[str], state_dir: Path | None = None, planner_security=None):
        self.planners = Planners(planner_addresses, security=planner_security)
        self.store = RolloutStore(state_dir) if state_dir is not None else None
        self._lock = threading.Lock()  # guards every rollout; drivers take it to apply answers
        self._rollouts: dict[str, ro.Rollout] = {}
        self._drivers: dict[str, RolloutDriver] = {}
        loaded = sorted(self.store.load() if self.store else [], key=_number)
        self._next = 1 + max((_number(r) for r in loaded), default=0)
        for rollout in loaded:
            self._rollouts[rollout.rollout_id] = rollout
            if rollout.state in ro.ACTIVE:
                self._drive(rollout, resumed=True)

    def ListNodes(self, request, context):
        return list_nodes(self.planners, request)

    def StartRollout(self, request, context):
        settings = ro.check_request(request)
        located = self._locate(request, context)
        if request.HasField("plan"):
            ro.check_plan_fits(request.plan, [status for _, status in located.values()])
        with self._lock:
            self._check_free(located)
            rollout_id = f"rollout-{self._next}"
            self._next += 1
            rollout = ro.new_rollout(rollout_id, request, settings, located, time.time_ns())
            self._rollouts[rollout_id] = rollout
            self._forget_old()
        if self.store is not None:
            self.store.save(rollout_id, lambda: self._snapshot(rollout))
        with self._lock:
            started = _summary(rollout)  # as started: the driver's first wave may answer at once
        self._drive(rollout)
        return started

    def GetRollout(self, request, context):
        size = check_page_size("page_size", request.page_size, DEFAULT_ROLLOUT_PAGE)
        after = page_after("page_token", request.page_token)
        with self._lock:
            rollout = self._find(request.rollout_id)
            answer = _summary(rollout)
            if request.summary_only:
                return answer
            ids = list(rollout.targets)
            first = bisect.bisect_right(ids, after)
            page = [rollout.targets[n] for n in ids[first:first + size]]
            page = [(t.node_id, t.planner, t.state, t.wave) for t in page]
            more = first + size < len(ids)
        answer.nodes.extend(self._nodes(page))
        answer.next_page_token = page_token(page[-1][0]) if more and page else ""
        return answer

    def ListRollouts(self, request, context):
        with self._lock:
            newest = sorted(self._rollouts.values(), key=_number, reverse=True)
            return fpb.ListRolloutsResponse(rollouts=[_summary(r) for r in newest])

    def PauseRollout(self, request, context):
        return self._act(request, lambda r: ro.pause(r, request.reason))

    def ResumeRollout(self, request, context):
        return self._act(request, ro.resume)

    def AbortRollout(self, request, context):
        return self._act(request, lambda r: ro.abort(r, request.rollback, request.reason))

    def close(self) -> None:
        """Stop every driver (their rollouts stay saved as they are) and the planner channels."""
        with self._lock:
            drivers = list(self._drivers.values())
        for driver in drivers:  # all told first, so a driver waiting on a planner delays no other
            driver.stop(timeout=0)
        for driver in drivers:
            driver.stop()
        self.planners.close()

    # -- helpers ---------------------------------------------------------------------------------

    def _locate(self, request: fpb.StartRolloutRequest, context) -> dict[str, tuple[str, ppb.ExecutorStatus]]:
        """The targets, each with its planner and status before the rollout: the node ids named
        (wherever they are; NOT_FOUND naming the unknown), else every connected executor the
        selector matches. A node two planners know is taken where it is connected."""
        named = list(request.node_ids)
        answers = self.planners.each(lambda a: self.planners.statuses(
            a, selector=request.selector, connected_only=not named))
        located: dict[str, tuple[str, ppb.ExecutorStatus]] = {}
        for address, answer in answers.items():
            if isinstance(answer, grpc.RpcError):
                context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot find the targets: {describe_error(address, answer)}")
            for status in answer:
                if status.node_id not in located or (status.connected and not located[status.node_id][1].connected):
                    located[status.node_id] = (address, status)
        if named:
            missing = [n for n in named if n not in located]
            if missing:
                raise NotFound(f"node_ids: unknown executors {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
            located = {n: located[n] for n in named}
        if not located:
            matching = f" matching {request.selector!r}" if request.selector else ""
            raise NotFound(f"selector: no connected executors{matching} to roll out to")
        return located

    def _check_free(self, located: dict) -> None:
        """Callers hold the lock."""
        active = [r for r in self._rollouts.values() if r.state in ro.ACTIVE]
        if len(active) >= MAX_ACTIVE_ROLLOUTS:
            raise Busy(f"{len(active)} rollouts are under way already; wait for one to end or abort one")
        for rollout in active:
            taken = [n for n in located if n in rollout.targets]
            if taken:
                raise Busy(f"node_ids: {taken[:5]} are in {rollout.rollout_id}, which is under way; wait for it to "
                           f"end or abort it")

    def _forget_old(self) -> None:
        """Callers hold the lock."""
        ended = sorted((r for r in self._rollouts.values() if r.state not in ro.ACTIVE), key=_number)
        for rollout in ended[:max(0, len(self._rollouts) - KEPT_ROLLOUTS)]:
            del self._rollouts[rollout.rollout_id]
            self._drivers.pop(rollout.rollout_id, None)
            if self.store is not None:
                self.store.delete(rollout.rollout_id)

    def _drive(self, rollout: ro.Rollout, resumed: bool = False) -> None:
        driver = RolloutDriver(rollout, self.planners, self.store, self._lock, resumed)
        with self._lock:
            self._drivers[rollout.rollout_id] = driver
        driver.start()

    def _find(self, rollout_id: str) -> ro.Rollout:
        check_text("rollout_id", rollout_id)
        rollout = self._rollouts.get(rollout_id)
        if rollout is None:
            raise NotFound(f"rollout_id: no rollout {rollout_id!r}")
        return rollout

    def _act(self, request: fpb.RolloutActionRequest, action) -> fpb.Rollout:
        """Pause, resume or abort: change the state and wake the driver, which saves it."""
        check_text("reason", request.reason, MAX_REASON_CHARS)
        with self._lock:
            rollout = self._find(request.rollout_id)
            action(rollout)
            rollout.updated_ns = time.time_ns()
            driver = self._drivers.get(rollout.rollout_id)
            answer = _summary(rollout)
        if driver is not None:
            driver.wake()
        return answer

    def _snapshot(self, rollout: ro.Rollout) -> dict:
        with self._lock:
            return to_json(rollout)

    def _nodes(self, page: list[tuple[str, str, int, int]]) -> list[fpb.FleetNode]:
        """A page of a rollout's nodes with their planners' brief statuses (just the node id for
        one whose planner does not answer)."""
        by_planner: dict[str, list[str]] = {}
        for node_id, planner, _, _ in page:
            by_planner.setdefault(planner, []).append(node_id)
        answers = self.planners.each(lambda a: self.planners.statuses(a, node_ids=by_planner[a]), by_planner)
        statuses = {s.node_id: s for answer in answers.values() if not isinstance(answer, grpc.RpcError)
                    for s in answer}
        return [fpb.FleetNode(planner=planner, status=statuses.get(node_id) or ppb.ExecutorStatus(node_id=node_id),
                              rollout_state=state, wave=wave) for node_id, planner, state, wave in page]


def _number(rollout: ro.Rollout) -> int:
    return int(rollout.rollout_id.rpartition("-")[2])


def _summary(rollout: ro.Rollout) -> fpb.Rollout:
    """The rollout without its nodes; callers hold the lock."""
    counts = rollout.counts()
    return fpb.Rollout(
        rollout_id=rollout.rollout_id, state=rollout.state, acked=counts[ro.ACKED], nacked=counts[ro.NACKED],
        pending=counts[ro.PENDING], unreachable=counts[ro.UNREACHABLE], waiting=counts[ro.WAITING],
        rolled_back=counts[ro.ROLLED_BACK], targeted=len(rollout.targets), started_ns=rollout.started_ns,
        wave=rollout.wave, waves=len(rollout.by_wave), message=rollout.message, updated_ns=rollout.updated_ns,
        request=rollout.request)


@dataclass
class FleetServer(transport.Server):
    """The control node's server: stopping it also stops its rollout drivers (their rollouts
    stay saved, and the next start with the same state directory resumes them)."""

    servicer: FleetServicer | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        super().stop(grace)
        if self.servicer is not None:
            self.servicer.close()


def serve(planner_addresses: list[str], address: str = "127.0.0.1:0", state_dir: Path | None = None,
          security=None, planner_security=None) -> FleetServer:
    """Start FleetService over ``planner_addresses``; with ``state_dir`` rollouts survive a
    restart (``state_dir/rollouts/``). ``security`` (``rpc.security.ServerSecurity``) guards this
    server, ``planner_security`` (``ClientSecurity``) the calls to the planners."""
    servicer = FleetServicer(planner_addresses, state_dir, planner_security)
    server = transport.start_server(lambda s: fleet_pb2_grpc.add_FleetServiceServicer_to_server(servicer, s),
                                    [SERVICE_NAME], address, unary_threads=16, security=security)
    return FleetServer(**{name: getattr(server, name) for name in server.__dataclass_fields__}, servicer=servicer)
