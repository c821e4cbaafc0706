"""What the planner knows about each executor, and which plan each should run.

Plain bookkeeping under one lock: the gRPC server checks each message first (``registration``),
then feeds it here and drains each executor's outbox into its stream. Every change is handed to
``persist`` (``state.PlannerState.save``), so a restarted planner knows what each executor was
asked to run, what it acknowledged and which plans an operator pinned.

The rules, in one place:
- A registering executor keeps the plan it runs: the planner adopts it (a plan the planner
  forgot, or an operator's), unless the planner still owes it a newer plan it missed while
  away, or it runs no planner's plan yet (version 0), or its budget changed while away, or
  the planner has searched a different plan for it (profiles and frontiers survive restarts).
- Plans come from ``policy.PlanPolicy``: searched for the executor's budget, device and
  recognised workload, or the even split as the fallback; a plan that would make the
  executor do what it does already is not sent.
- An operator's plan (``push`` with a plan) is pinned: budget changes and registrations
  leave it in place until the next push; a push without a plan unpins and replans.
- Versions only grow, by one per plan sent, never past ``MAX_PLAN_VERSION``; a registration
  whose plan is more than ``MAX_VERSION_STEP`` ahead of what the planner issued is refused.
- A node id is claimed once, and records of executors gone for good expire (``claims``);
  ``forget`` releases an id; at most ``RegistrySettings.max_nodes`` records are kept.
- A profile is asked of a connected executor only, one at a time per executor and
  ``MAX_PROFILES`` in all; the asker waits on its ``PendingProfile`` outside the lock, and a
  stream that ends fails the profiles it owed.
"""

from __future__ import annotations

import bisect
import secrets
import threading
import time
from typing import Callable

from swapmoe.core.errors import Busy, Conflict, InvalidField, NotFound
from swapmoe.core.labels import Selector
from swapmoe.core.limits import next_version
from swapmoe.core.plan import BudgetChange, Plan
from swapmoe.core.sizes import format_size
from swapmoe.planner_service import claims
from swapmoe.planner_service.claims import RegistrySettings
from swapmoe.planner_service.policy import PlannerSettings, PlanPolicy
from swapmoe.planner_service.records import ExecutorRecord, PendingProfile, count, digest
from swapmoe.planner_service.registration import Registered
from swapmoe.v1 import common_pb2, executor_pb2 as epb, planner_pb2 as ppb

# Profiles waited for at once (each holds one of the planner's unary threads while it waits).
MAX_PROFILES = 8
# Executors planned per turn of the lock in a fleet-wide push: the streams' messages wait at
# most one chunk (~1 ms) for the lock, not the whole fleet.
PUSH_CHUNK = 64


class Registry:
    def __init__(self, records: list[ExecutorRecord] = (), persist: Callable[[ExecutorRecord], None] = lambda r: None,
                 planning: PlannerSettings = PlannerSettings(), settings: RegistrySettings = RegistrySettings(),
                 erase: Callable[[str], None] = lambda node_id: None):
        """``records``: executors known from before a restart (disconnected until they register);
        ``planning``: how the policy chooses plans (profiles, frontiers, workloads); ``persist`` and
        ``erase`` keep and drop a record on disk."""
        self._lock = threading.Lock()
        self._records: dict[str, ExecutorRecord] = {r.node_id: r for r in records}
        self._order: list[str] = sorted(self._records)  # node ids in order, for pages
        for record in self._records.values():
            record.connected, record.away_since_ns = False, time.time_ns()
        self._profiling = 0  # profiles asked and not answered, over every executor
        self._persist, self._erase = persist, erase
        self.settings = settings
        self.policy = PlanPolicy(planning, on_plan_ready=self.replan, connected=self.connected,
                                 profile=self.profile_device)

    def connect(self, registered: Registered, address: str | None = None) -> tuple[ExecutorRecord, str]:
        """Register (or resync) a checked registration; returns its record and the node's secret,
        and queues the plan the executor should run if it runs another. ``address``: where clients
        reach it, as the planner verified it (``registration.published_address``); None keeps the
        registered one (an in-process caller)."""
        reg, current = registered.registration, registered.current
        with self._lock:  # refused before the planner hears of it: a refused registration changes nothing
            self._admissible(self._records.get(reg.node_id), reg, current)
        measure = self.policy.prepare(reg.node_id, reg.model_fingerprint, registered.memory)  # reads files: unlocked
        with self._lock:
            old = self._records.get(reg.node_id)
            secret = self._admissible(old, reg, current)  # again: the record may have changed meanwhile
            running = current.version if current else 0
            if old is not None:
                old.outbox.close()  # ends a lingering stream of the same executor
            else:
                self._make_room()
                bisect.insort(self._order, reg.node_id)
            stored = ppb.Registration()
            stored.CopyFrom(reg)
            stored.ClearField("node_secret")
            if address is not None:
                stored.executor_address = address
            record = ExecutorRecord(reg.node_id, stored, registered.memory, last_seen_ns=time.time_ns(),
                                    secret_digest=digest(secret), claimed=bool(old and old.claimed))
            record.version = max(running, old.version if old else 0)
            if old is not None:
                record.pinned, record.desired, record.acked, record.state = old.pinned, old.desired, old.acked, old.state
                record.workload, record.reason, record.found = old.workload, old.reason, old.found
            if running:  # the executor runs a planner's plan: adopt it
                record.acked = current
                if record.desired is None or record.desired.version <= running:
                    record.desired, record.state = current, ppb.PLAN_STATE_ACKED
            self._records[record.node_id] = record
            self._on_register(record, old, running)
            self._persist(record)
        if measure:
            self.policy.measure(record.node_id)
        self.policy.registered(record.node_id)
        return record, secret

    @staticmethod
    def _admissible(old: ExecutorRecord | None, reg, current) -> str:
        """The node's secret once the registration may take its id; Forbidden or InvalidField else."""
        secret = claims.admit(old, reg.node_secret)
        claims.check_version_step(current.version if current else 0, old.version if old else 0)
        return secret

    def _make_room(self) -> None:
        """Room for one more record: expired ones go first; Busy when every record is current."""
        if len(self._records) < self.settings.max_nodes:
            return
        self._expire(time.time_ns())
        if len(self._records) >= self.settings.max_nodes:
            raise Busy(f"this planner keeps {self.settings.max_nodes} executors, the most it may; forget away ones "
                       f"(swapmoe planner forget) or raise --max-nodes")

    def _on_register(self, record: ExecutorRecord, old: ExecutorRecord | None, running: int) -> None:
        """What a (re)registered executor is sent; caller holds the lock."""
        owed = record.desired if record.desired and record.desired.version > running else None
        if owed is not None and (record.state == ppb.PLAN_STATE_PENDING or record.pinned):
            self._send(record, owed)  # it missed it, or lost it in a restart
        elif record.pinned:
            return
        elif not running:
            self._replan(record, why="registered running no planner's plan")
        elif old is not None and old.budget_bytes != record.budget_bytes:
            self._replan(record, why=f"budget changed to {format_size(record.budget_bytes)} while away")
        elif self.policy.searched(record):
            self._replan(record, why="registered")  # sends nothing when it runs the searched plan already

    def disconnect(self, record: ExecutorRecord) -> None:
        with self._lock:
            if self._records.get(record.node_id) is record:
                record.connected = False
                record.away_since_ns = time.time_ns()
            owed, record.profiles = record.profiles, {}
            self._profiling -= len(owed)
        for pending in owed.values():  # a stream that ended will not answer: fail them now
            pending.finish(None, f"executor {record.node_id!r} disconnected while profiling (executor or planner "
                                 f"restarting, or the network lost); ask again once it is back")

    def seen(self, record: ExecutorRecord) -> None:
        """A message from ``record``'s stream: it has its secret (it came after the Welcome)."""
        record.last_seen_ns = time.time_ns()
        if not record.claimed:
            with self._lock:
                record.claimed = True
                self._persist(record)

    def forget(self, node_ids: list[str]) -> list[str]:
        """Forget these away executors (records, plans, secrets): their ids may be claimed anew.
        NotFound for an unknown one, Conflict for a connected one; then nothing is forgotten."""
        with self._lock:
            records = self._targets(node_ids)
            connected = [r.node_id for r in records if r.connected]
            if connected:
                raise Conflict(f"node_ids: {connected[:10]} are connected; only an executor that is away can be "
                               f"forgotten (stop it first)")
            for record in records:
                self._remove(record)
        return [r.node_id for r in records]

    def expire(self, now_ns: int | None = None) -> list[str]:
        """Forget the executors away past their lifetime (``RegistrySettings``); the ids forgotten."""
        with self._lock:
            return self._expire(time.time_ns() if now_ns is None else now_ns)

    def _expire(self, now_ns: int) -> list[str]:
        gone = claims.expired(self._records.values(), now_ns, self.settings)
        for record in gone:
            self._remove(record)
        return [r.node_id for r in gone]

    def _remove(self, record: ExecutorRecord) -> None:
        del self._records[record.node_id]
        self._order.pop(bisect.bisect_left(self._order, record.node_id))
        self._erase(record.node_id)
        self.policy.forget(record.node_id)

    def connected(self, node_id: str) -> bool:
        record = self._records.get(node_id)
        return record is not None and record.connected

    def on_result(self, record: ExecutorRecord, result: common_pb2.PlanResult) -> None:
        with self._lock:
            record.last_result = result
            if record.desired and result.plan_version == record.desired.version:
                record.state = ppb.PLAN_STATE_ACKED if result.accepted else ppb.PLAN_STATE_NACKED
                if result.accepted:
                    record.acked = record.desired
                elif record.budget_before:  # the device kept its budget
                    record.budget_bytes = record.budget_before
                record.budget_before = 0
            if result.HasField("memory"):
                record.memory = result.memory
            self._persist(record)

    def on_budget_change(self, record: ExecutorRecord, change: BudgetChange) -> None:
        """The device changed its budget (not with a plan: that budget is planned for already): plan
        again for the new one (a pinned plan stays)."""
        with self._lock:
            record.budget_bytes = change.budget_bytes
            if not record.pinned:
                self._replan(record, why=f"budget change to {format_size(change.budget_bytes)}"
                                         + (f" ({change.reason})" if change.reason else ""))
            self._persist(record)

    def on_telemetry(self, record: ExecutorRecord, event) -> None:
        kind = event.WhichOneof("payload")
        if kind in ("memory", "throughput"):  # one reference replaced: readers see the old report or the new one
            setattr(record, kind, getattr(event, kind))
        why = self.policy.observe_load(record, event.throughput.running, event.throughput.queue_depth) \
            if kind == "throughput" else None  # the offered load may call for other rows: the lock only then
        if not why and kind != "experts":
            return
        with self._lock:
            if kind == "experts" and (why := self.policy.observe(record, [list(layer.activations)
                                                                         for layer in event.experts.layers])):
                record.workload = self.policy.recognised(record.node_id)
            if why:
                if not record.pinned and record.connected:
                    self._replan(record, why=why)
                self._persist(record)

    def replan(self, node_id: str, why: str) -> None:
        """The policy has a better answer for ``node_id`` (a frontier, a refined search): send it
        unless the executor runs it already (then why the plan runs stays as it was), is pinned or
        is away."""
        with self._lock:
            record = self._records.get(node_id)
            if record is None or not record.connected or record.pinned:
                return
            self._replan(record, why=why, quiet=True)
            self._persist(record)

    def statuses(self, records: list[ExecutorRecord], brief: bool = False) -> list[ppb.ExecutorStatus]:
        return [r.to_pb(self.policy.status(r.node_id), brief) for r in records]

    def page(self, node_ids: list[str], selector: Selector, after: str, size: int, connected_only: bool = False,
             states: frozenset[int] = frozenset()) -> tuple[list[ExecutorRecord], str, ppb.StatusSummary]:
        """The executors that match (the named ones, else all; connected ones, ones in ``states``)
        after node id ``after``, at most ``size`` in node id order; the last node id when more follow
        ("" otherwise); counts over every match."""
        summary = ppb.StatusSummary()
        page, more = [], False
        with self._lock:
            records = self._targets(sorted(set(node_ids))) if node_ids else (self._records[n] for n in self._order)
            for record in records:
                if ((connected_only and not record.connected) or (states and record.state not in states)
                        or not selector.matches(record.registration.labels)):
                    continue
                count(summary, record)
                if record.node_id > after:
                    if len(page) < size:
                        page.append(record)
                    else:
                        more = True
        return page, (page[-1].node_id if more and page else ""), summary

    def push(self, node_ids: list[str], plan: Plan | None, selector: Selector = Selector(),
             budget: int = 0) -> list[ExecutorRecord]:
        """Send and pin ``plan`` to the named executors (else every connected one the selector
        matches); with no plan, unpin them and send each the plan computed for its budget. With
        ``budget``, the plan carries it: the executor sets both or neither."""
        targets = self.select(node_ids, selector)
        for start in range(0, len(targets), PUSH_CHUNK):  # the lock is let go between chunks
            self.push_to(targets[start:start + PUSH_CHUNK], plan, budget)
        return targets

    def select(self, node_ids: list[str], selector: Selector = Selector()) -> list[ExecutorRecord]:
        """A push's targets: the named executors (NotFound for one unknown), else every connected
        one the selector matches."""
        with self._lock:
            if node_ids:
                return self._targets(node_ids)
            return [r for r in (self._records[n] for n in self._order)
                    if r.connected and selector.matches(r.registration.labels)]

    def push_to(self, records: list[ExecutorRecord], plan: Plan | None, budget: int = 0) -> None:
        """``push`` to these records, under one turn of the lock."""
        with self._lock:
            for record in records:
                self._push(record, plan, budget)
                self._persist(record)

    def _push(self, record: ExecutorRecord, plan: Plan | None, budget: int) -> None:
        record.pinned = plan is not None
        planned_for = budget if budget and _accepts(record, budget) else 0
        if budget:
            record.budget_before = record.budget_before or record.budget_bytes
            if planned_for:  # plans for the new budget; a refused budget goes with the plan running
                record.budget_bytes = budget
        what = f" with budget {format_size(budget)}" if budget else ""
        if plan is not None:
            self._send(record, plan.with_budget(budget).with_version(next_version(record.version)))
            record.reason, record.found = f"operator push (pinned){what}", None
        elif budget and not planned_for:
            running = record.acked or record.memory_model.default_plan(record.budget_bytes, 0, "")
            self._send(record, running.with_budget(budget).with_version(next_version(record.version)))
            record.reason, record.found = f"operator push{what} (below what the executor accepts)", None
        else:
            self._replan(record, force=True, why=f"operator push without a plan (unpinned){what}", budget=budget)

    def ask_profile(self, node_id: str, request: epb.ProfileRequest) -> PendingProfile:
        """Send a profile request down ``node_id``'s stream; the caller waits on the result
        (outside the lock) and calls ``end_profile`` when done waiting. Raises NotFound for an
        executor that is unknown or not connected, Busy when it is profiling already or too many
        profiles are waited for."""
        with self._lock:
            record = self._records.get(node_id)
            if record is None or not record.connected:
                state = "unknown" if record is None else "not connected"
                raise NotFound(f"node_id: executor {node_id!r} is {state}")
            if record.profiles:
                raise Busy(f"node_id: executor {node_id!r} is profiling already; ask again once it is done")
            if self._profiling >= MAX_PROFILES:
                raise Busy(f"{MAX_PROFILES} profiles are running already; ask again once one is done")
            pending = PendingProfile(node_id, secrets.token_hex(8))
            record.profiles[pending.request_id] = pending
            self._profiling += 1
            record.outbox.put(ppb.PlannerMessage(profile_request=ppb.ProfileAsk(request_id=pending.request_id,
                                                                                request=request)))
            return pending

    def profile_device(self, node_id: str, request: epb.ProfileRequest, timeout_s: float) -> epb.ProfileResult:
        """Ask ``node_id`` for a device profile down its stream and wait for it (raises when none comes)."""
        pending = self.ask_profile(node_id, request)
        try:
            return pending.result(timeout_s)
        finally:
            self.end_profile(pending)

    def on_profile_result(self, record: ExecutorRecord, outcome: ppb.ProfileOutcome) -> None:
        """An executor's answer; one nobody waits for (any more) is dropped."""
        with self._lock:
            pending = record.profiles.pop(outcome.request_id, None)
            self._profiling -= pending is not None
        if pending is not None:
            pending.finish(outcome)

    def end_profile(self, pending: PendingProfile) -> None:
        """The asker stops waiting: an unanswered profile is cancelled on the executor."""
        with self._lock:
            record = self._records.get(pending.node_id)
            if record is not None and record.profiles.pop(pending.request_id, None) is not None:
                self._profiling -= 1
                if record.connected:
                    record.outbox.put(ppb.PlannerMessage(cancel_profile=pending.request_id))

    def find(self, node_ids: list[str]) -> list[ExecutorRecord]:
        with self._lock:
            return self._targets(node_ids) if node_ids else [self._records[n] for n in self._order]

    # callers hold the lock
    def _targets(self, node_ids: list[str]) -> list[ExecutorRecord]:
        missing = [n for n in node_ids if n not in self._records]
        if missing:
            raise NotFound(f"node_ids: unknown executors {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        return [self._records[n] for n in dict.fromkeys(node_ids)]

    def _replan(self, record: ExecutorRecord, force: bool = False, why: str = "", budget: int = 0, quiet=False) -> None:
        choice = self.policy.choose(record, why)
        plan = choice.plan.with_budget(budget).with_version(next_version(record.version))
        running = record.desired if record.state == ppb.PLAN_STATE_PENDING else record.acked
        if force or running is None or _what(running) != _what(plan):
            self._send(record, plan)
            record.reason, record.found = choice.reason, choice.found
        elif why:  # e.g. a new workload whose plan runs: its prediction; why, unless the policy's own search
            record.found = choice.found
            record.reason = record.reason if quiet else f"{choice.reason} (the executor runs it already)"

    def _send(self, record: ExecutorRecord, plan: Plan) -> None:
        record.desired, record.state = plan, ppb.PLAN_STATE_PENDING
        record.version = max(record.version, plan.version)
        record.outbox.put_plan(plan)


def _accepts(record: ExecutorRecord, budget: int) -> bool:
    try:
        record.memory_model.check_budget(budget)
    except InvalidField:
        return False
    return True


def _what(plan: Plan) -> tuple:
    """What a plan makes an executor do (its version and origin aside)."""
    return plan.experts_per_layer, plan.update_frequency, plan.strategy, plan.rows, plan.precisions
