"""One rollout driven on a thread of its own: push a wave, watch its nodes answer, decide,
bake, go on; a halt or an abort with rollback sends the nodes reached their previous plans.

The policy is ``rollouts`` (pure); this module only calls planners and applies what they say
under the control node's lock. A wave is one PushPlan per planner with the wave's node ids
(brief answers), then GetPlanStatus for the nodes still pending every ``POLL_S`` until each
answered or the wave's timeout; nodes whose planner did not answer the push (it is restarting)
are pushed again (after 1 s, backing off to 8 s; not while paused), and a node away counts as failed only once the wave's time
is up, since a restarted planner's executors take a moment to return. The rollout is saved (``rollout_store``) after every push and
decision, and throttled while ACKs stream in. A driver started on a rollout read back from disk
re-polls its current wave (the versions sent are kept), with a fresh timeout: the control node
being away is not the executors' fault.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import grpc

from swapmoe.orchestration import rollouts as ro
from swapmoe.orchestration.planners import Planners, describe_error
from swapmoe.orchestration.rollout_store import RolloutStore, to_json
from swapmoe.v1 import planner_pb2 as ppb

log = logging.getLogger(__name__)
POLL_S = 0.15
FULL_POLL_S = 3.0
IDLE_S = 1.0  # a paused driver looks at its rollout at least this often
ROLLBACK_TRIES = 3
ROLLBACK_RETRY_S = 1.0
# A wave's nodes whose planner did not answer the push are pushed again after 1 s, then 2, 4, 8, 8...
REPUSH_S, MAX_REPUSH_S = 1.0, 8.0
# A planner that refuses a push for what it carries (a plan that does not fit a model) NACKs it
# for its nodes; any other failure leaves them unreachable.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE)


class RolloutDriver:
    def __init__(self, rollout: ro.Rollout, planners: Planners, store: RolloutStore | None, lock: threading.Lock,
                 resumed: bool = False):
        self.rollout, self.planners, self.store, self.lock = rollout, planners, store, lock
        self._wake, self._stop = threading.Event(), threading.Event()
        self._full_poll = time.monotonic()  # the wave was just sent: nobody answered yet
        self._pushed_at = 0.0  # monotonic time of the last push
        self._repush_s = REPUSH_S  # the wait before the next push to nodes not pushed yet
        self._thread = threading.Thread(target=self._run, name=rollout.rollout_id, daemon=True)
        if resumed and rollout.wave_started_ns:
            rollout.wave_started_ns = time.time_ns()

    def start(self) -> "RolloutDriver":
        self._thread.start()
        return self

    def wake(self) -> None:
        """The rollout changed (paused, resumed, aborted): look at it now."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop driving (the rollout stays as it is, saved, for the next start)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._step():
                pass
        except Exception as error:  # noqa: BLE001 - a driver that dies says why in its rollout
            log.exception("%s: the driver failed", self.rollout.rollout_id)
            with self.lock:
                self.rollout.state, self.rollout.message = ro.FAILED, f"the control node failed: {error!r}"
        finally:
            self._save(urgent=True)

    def _step(self) -> bool:
        """One turn; False once the rollout needs no driver."""
        r = self.rollout
        with self.lock:
            state, pushed, wait_s = r.state, r.wave_started_ns != 0, (r.next_wave_ns - time.time_ns()) / 1e9
        if state == ro.ROLLING_BACK:
            self._roll_back()
            return False
        if state not in (ro.IN_PROGRESS, ro.PAUSED):
            return False
        if not pushed:
            if state == ro.PAUSED or wait_s > 0:
                self._save(urgent=False, flush=True)
                self._sleep(IDLE_S if state == ro.PAUSED else min(IDLE_S, wait_s))
            else:
                self._push_wave()
            return True
        if state == ro.IN_PROGRESS and self._unsent() and time.monotonic() - self._pushed_at >= self._repush_s:
            self._repush_s = min(2 * self._repush_s, MAX_REPUSH_S)
            self._push_wave()  # a planner that was away (restarting) when the wave went
        self._poll_wave()
        if self._decide() is ro.Decision.WAIT:
            self._sleep(POLL_S)
        return True

    def _unsent(self) -> bool:
        """Whether nodes of the wave were not pushed for want of their planner (not refused)."""
        with self.lock:
            return any(not t.version and t.state == ro.UNREACHABLE for t in self.rollout.wave_targets())

    def _push_wave(self) -> None:
        """Push the wave to the nodes not pushed yet; its timeout runs from the first push."""
        r = self.rollout
        self._pushed_at = time.monotonic()
        with self.lock:
            unsent = [t for t in r.wave_targets() if not t.version and t.state != ro.NACKED]
            request = r.request
        by_planner = _group(unsent)

        def push(address: str) -> ppb.PushPlanResponse:
            wave = ppb.PushPlanRequest(node_ids=[t.node_id for t in by_planner[address]],
                                       budget_bytes=request.budget_bytes, view=ppb.STATUS_VIEW_BRIEF)
            if request.HasField("plan"):
                wave.plan.CopyFrom(request.plan)
            return self.planners.push(address, wave)

        results = self.planners.each(push, by_planner)
        with self.lock:
            for address, result in results.items():
                _apply_push(by_planner[address], address, result)
            r.updated_ns = time.time_ns()
            r.wave_started_ns = r.wave_started_ns or r.updated_ns
        self._save(urgent=True)

    def _poll_wave(self) -> None:
        with self.lock:
            watched = [t for t in self.rollout.wave_targets() if t.version and t.state in (ro.PENDING, ro.UNREACHABLE)]
            if not watched:
                return
        by_planner = _group(watched)
        # Most polls ask only for the nodes that answered (a wave of 10,000 would otherwise read
        # 10,000 statuses, 5 MB, every POLL_S); every FULL_POLL_S all of them, to see the rest.
        full = time.monotonic() - self._full_poll >= FULL_POLL_S
        answered = () if full else (ppb.PLAN_STATE_ACKED, ppb.PLAN_STATE_NACKED)
        if full:
            self._full_poll = time.monotonic()
        results = self.planners.each(lambda a: self.planners.statuses(a, node_ids=[t.node_id for t in by_planner[a]],
                                                                      states=answered), by_planner)
        with self.lock:
            for address, result in results.items():
                if isinstance(result, grpc.RpcError):
                    for target in by_planner[address]:
                        target.reason = describe_error(address, result) if target.state == ro.PENDING else target.reason
                    continue
                targets = {t.node_id: t for t in by_planner[address]}
                for status in result:
                    if status.node_id in targets:
                        ro.observe(targets[status.node_id], status)

    def _decide(self) -> ro.Decision:
        r = self.rollout
        with self.lock:
            now = time.time_ns()
            timed_out = now >= r.wave_started_ns + r.settings.timeout_ms * 1_000_000
            if timed_out:
                ro.expire(r.wave_targets(), r.settings.timeout_ms)
            decision = ro.decide(r, timed_out)
            if decision is ro.Decision.HALT:
                r.state, r.ends_as, r.message = ro.ROLLING_BACK, ro.FAILED, ro.failure_message(r, halted=True)
            elif decision is ro.Decision.WAVE_DONE:
                r.wave, r.wave_started_ns, r.next_wave_ns = r.wave + 1, 0, now + r.settings.bake_ms * 1_000_000
                self._repush_s = REPUSH_S
            elif decision is ro.Decision.SUCCEEDED:
                failed = any(t.state in (ro.NACKED, ro.UNREACHABLE) for t in r.sent())
                r.state, r.message = ro.SUCCEEDED, ro.failure_message(r, halted=False) if failed else ""
            r.updated_ns = now
        self._save(urgent=decision is not ro.Decision.WAIT)
        return decision

    def _roll_back(self) -> None:
        """Previous plans to every node reached, a few tries per planner; the rollout then ends
        as it was meant to (FAILED after a halt, ABORTED after an abort)."""
        failures: dict[str, str] = {}
        for _ in range(ROLLBACK_TRIES):
            with self.lock:
                pushes = [(a, p) for a, p in ro.rollback_pushes(self.rollout) if not failures or a in failures]
            failures = self._send_rollback(pushes)
            if not failures or self._stop.is_set():
                break
            self._sleep(ROLLBACK_RETRY_S)
        if self._stop.is_set() and failures:
            return  # still ROLLING_BACK: the next start finishes it
        with self.lock:
            r = self.rollout
            r.state, r.updated_ns = r.ends_as, time.time_ns()
            if failures:
                r.message += "; the rollback did not reach " + "; ".join(failures.values())
        self._save(urgent=True)

    def _send_rollback(self, pushes: list[tuple[str, ppb.PushPlanRequest]]) -> dict[str, str]:
        """Each planner's pushes in turn, planners at once; the planners that failed, and why."""
        by_planner = defaultdict(list)
        for address, push in pushes:
            by_planner[address].append(push)

        def send(address: str) -> list[ppb.PushPlanRequest]:
            done = []
            for push in by_planner[address]:
                self.planners.push(address, push)
                done.append(push)
                with self.lock:
                    ro.rolled_back(self.rollout, list(push.node_ids))
            return done

        results = self.planners.each(send, by_planner)
        return {a: describe_error(a, e) for a, e in results.items() if isinstance(e, grpc.RpcError)}

    def _sleep(self, seconds: float) -> None:
        if self._wake.wait(max(seconds, 0.0)):
            self._wake.clear()

    def _save(self, urgent: bool, flush: bool = False) -> None:
        if self.store is None:
            return

        def snapshot() -> dict:
            with self.lock:
                return to_json(self.rollout)

        try:
            if flush:
                self.store.flush(self.rollout.rollout_id, snapshot)
            else:
                self.store.save(self.rollout.rollout_id, snapshot, urgent)
        except OSError as error:  # a full disk must not stop the rollout; the next save tries again
            log.warning("%s: cannot save its state: %s", self.rollout.rollout_id, error)


def _group(targets: list[ro.Target]) -> dict[str, list[ro.Target]]:
    by_planner = defaultdict(list)
    for target in targets:
        by_planner[target.planner].append(target)
    return dict(by_planner)


def _apply_push(targets: list[ro.Target], address: str, result) -> None:
    """What a planner answered to a wave's push: each node pushed is pending (or answered
    already); a refused push is a NACK for its nodes, a failed one leaves them unreachable."""
    if isinstance(result, grpc.RpcError):
        refused = result.code() in _REFUSED
        for target in targets:
            target.state = ro.NACKED if refused else ro.UNREACHABLE
            target.reason = f"{'refused by ' if refused else ''}{describe_error(address, result)}"
        return
    statuses = {s.node_id: s for s in result.executors}
    for target in targets:
        status = statuses.get(target.node_id)
        if status is None or not status.desired_plan.version:
            target.state, target.reason = ro.UNREACHABLE, f"planner {address} did not push to it"
            continue
        target.version, target.state = status.desired_plan.version, ro.PENDING
        ro.observe(target, status)
