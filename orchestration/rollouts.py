"""Staged rollouts as plain data: who goes in which wave, where each node stands, what to do
after each look at the fleet, and what a rollback sends.

A rollout sends one plan (or a budget policy) to its targets in waves: a canary of a few
nodes, then waves that reach a cumulative percentage of the targets (10%, 50%, 100%). After
each wave the nodes sent so far are counted; once more than ``max_failure_share`` of them
NACKed or were unreachable (the canary: any of them), the rollout halts and every node it
reached is given back what it ran before. Nothing here talks to a planner, starts a thread or
touches a file: the driver (``rollout_driver``) and the store (``rollout_store``) wrap it, so
the policy is tested in milliseconds.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from swapmoe.core.errors import InvalidField
from swapmoe.core.labels import parse_selector
from swapmoe.core.limits import (MAX_BYTES, MAX_EXPERTS_PER_LAYER, MAX_LAYERS, MAX_LABEL_CHARS, MAX_REASON_CHARS,
                                 MAX_ROLLOUT_TIMEOUT_MS, MAX_ROWS, MAX_UPDATE_FREQUENCY, check_count, check_finite,
                                 check_node_ids, check_range, check_text)
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb, planner_pb2 as ppb

WAITING, PENDING, ACKED = fpb.ROLLOUT_NODE_STATE_WAITING, fpb.ROLLOUT_NODE_STATE_PENDING, fpb.ROLLOUT_NODE_STATE_ACKED
NACKED, UNREACHABLE = fpb.ROLLOUT_NODE_STATE_NACKED, fpb.ROLLOUT_NODE_STATE_UNREACHABLE
ROLLED_BACK = fpb.ROLLOUT_NODE_STATE_ROLLED_BACK
IN_PROGRESS, SUCCEEDED, FAILED = fpb.ROLLOUT_STATE_IN_PROGRESS, fpb.ROLLOUT_STATE_SUCCEEDED, fpb.ROLLOUT_STATE_FAILED
PAUSED, ABORTED, ROLLING_BACK = fpb.ROLLOUT_STATE_PAUSED, fpb.ROLLOUT_STATE_ABORTED, fpb.ROLLOUT_STATE_ROLLING_BACK
ACTIVE = frozenset({IN_PROGRESS, PAUSED, ROLLING_BACK})  # a driver still works on these

DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_CANARY_NODES = 1
DEFAULT_WAVE_PERCENTS = (10, 50, 100)
DEFAULT_MAX_FAILURE_SHARE = 0.05
MAX_CANARY_NODES = 1_000  # a canary is a few nodes; past this it is a wave
MAX_WAVES = 100
NAMED_FAILURES = 5  # failures a rollout's message names; the rest are counted


@dataclass(frozen=True)
class Settings:
    """How a rollout goes, defaults applied."""

    canary_nodes: int = DEFAULT_CANARY_NODES
    wave_percents: tuple[int, ...] = DEFAULT_WAVE_PERCENTS
    max_failure_share: float = DEFAULT_MAX_FAILURE_SHARE
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    bake_ms: int = 0


def check_request(request: fpb.StartRolloutRequest) -> Settings:
    """Every field bounded (InvalidField names it); the rollout's settings with defaults."""
    check_node_ids("node_ids", request.node_ids)
    seen = set()
    for i, node_id in enumerate(request.node_ids):
        if node_id in seen:
            raise InvalidField(f"node_ids[{i}]", f"{node_id!r} is listed twice")
        seen.add(node_id)
    parse_selector(request.selector)
    if request.node_ids and request.selector:
        raise InvalidField("selector", "give node_ids or a selector, not both")
    if request.HasField("plan"):
        check_plan(request.plan)
    check_range("budget_bytes", request.budget_bytes, 0, MAX_BYTES)
    check_range("timeout_ms", request.timeout_ms, 0, MAX_ROLLOUT_TIMEOUT_MS)
    check_range("bake_ms", request.bake_ms, 0, MAX_ROLLOUT_TIMEOUT_MS)
    check_text("description", request.description, MAX_REASON_CHARS)
    canary = request.canary_nodes if request.HasField("canary_nodes") else DEFAULT_CANARY_NODES
    check_range("canary_nodes", canary, 0, MAX_CANARY_NODES)
    share = request.max_failure_share if request.HasField("max_failure_share") else DEFAULT_MAX_FAILURE_SHARE
    check_finite("max_failure_share", share)
    check_range("max_failure_share", share, 0.0, 1.0)
    return Settings(canary, _wave_percents(request.wave_percents), share,
                    request.timeout_ms or DEFAULT_TIMEOUT_MS, request.bake_ms)


def _wave_percents(percents) -> tuple[int, ...]:
    check_count("wave_percents", percents, MAX_WAVES)
    for i, percent in enumerate(percents):
        check_range(f"wave_percents[{i}]", percent, 1, 100)
        if i and percent <= percents[i - 1]:
            raise InvalidField(f"wave_percents[{i}]", f"{percent} does not follow {percents[i - 1]}: the "
                                                      f"percentages are cumulative, strictly ascending")
    if percents and percents[-1] != 100:
        raise InvalidField(f"wave_percents[{len(percents) - 1}]", "the last wave reaches every target: end at 100")
    return tuple(percents) or DEFAULT_WAVE_PERCENTS


def check_plan(plan: common_pb2.Plan) -> None:
    """What can be checked without the targets' layouts (their planners check the rest)."""
    check_count("plan.experts_per_layer", plan.experts_per_layer, MAX_LAYERS)
    if not plan.experts_per_layer:
        raise InvalidField("plan.experts_per_layer", "is empty: give the experts each MoE layer keeps")
    for i, kept in enumerate(plan.experts_per_layer):
        check_range(f"plan.experts_per_layer[{i}]", kept, 1, MAX_EXPERTS_PER_LAYER)
    check_range("plan.update_frequency", plan.update_frequency, 0, MAX_UPDATE_FREQUENCY)
    check_range("plan.rows", plan.rows, 0, MAX_ROWS)
    if plan.strategy not in common_pb2.NonResidentStrategy.values():
        raise InvalidField("plan.strategy", f"unknown strategy value {plan.strategy}")
    check_text("plan.origin", plan.origin, MAX_LABEL_CHARS)
    check_range("plan.budget_bytes", plan.budget_bytes, 0, MAX_BYTES)


def check_plan_fits(plan: common_pb2.Plan, statuses: list[ppb.ExecutorStatus]) -> None:
    """A plan with the wrong number of layers for a target's model is refused before any wave:
    a target's current plan (in a brief status too) has one entry per MoE layer."""
    for status in statuses:
        layers = len(status.desired_plan.experts_per_layer)
        if layers and layers != len(plan.experts_per_layer):
            raise InvalidField("plan.experts_per_layer", f"has {len(plan.experts_per_layer)} entries but "
                                                         f"{status.node_id}'s model has {layers} MoE layers")


def waves(node_ids, canary_nodes: int, wave_percents) -> list[list[str]]:
    """The targets by wave, in node id order: the first ``canary_nodes`` alone, then each wave up
    to its cumulative percentage of all targets (rounded up); empty waves are left out."""
    ids = sorted(node_ids)
    canary = min(canary_nodes, len(ids))
    result = [ids[:canary]] if canary else []
    reached = canary
    for percent in wave_percents:
        upto = max(reached, -(-len(ids) * percent // 100))
        if upto > reached:
            result.append(ids[reached:upto])
        reached = upto
    return result


@dataclass(frozen=True)
class Previous:
    """What a node ran before the rollout, for a rollback: its pinned plan (version and budget
    cleared; None when its planner chose the plan) and its budget."""

    plan: common_pb2.Plan | None
    budget_bytes: int


def previous_of(status: ppb.ExecutorStatus) -> Previous:
    plan = None
    if status.pinned and status.desired_plan.experts_per_layer:
        plan = common_pb2.Plan()
        plan.CopyFrom(status.desired_plan)
        plan.version, plan.budget_bytes = 0, 0
    return Previous(plan, status.budget_bytes)


@dataclass
class Target:
    """One node of a rollout: its planner, wave, the plan version sent (0: not yet) and its state."""

    node_id: str
    planner: str
    wave: int
    previous: Previous
    version: int = 0
    state: int = WAITING
    reason: str = ""  # why it NACKed or is unreachable


@dataclass
class Rollout:
    """A rollout's whole state; ``targets`` in node id order. Timestamps are wall-clock ns, so
    they mean the same after a restart."""

    rollout_id: str
    request: fpb.StartRolloutRequest
    settings: Settings
    targets: dict[str, Target]
    started_ns: int
    state: int = IN_PROGRESS
    wave: int = 0
    message: str = ""
    updated_ns: int = 0
    wave_started_ns: int = 0  # when the current wave was pushed; 0: not yet
    next_wave_ns: int = 0  # baking: the current wave is pushed no earlier
    ends_as: int = FAILED  # the state a rollback ends in
    by_wave: list[list[str]] = field(default_factory=list)

    def __post_init__(self):
        if not self.by_wave:
            count = 1 + max((t.wave for t in self.targets.values()), default=-1)
            self.by_wave = [[] for _ in range(count)]
            for target in self.targets.values():
                self.by_wave[target.wave].append(target.node_id)

    @property
    def has_canary(self) -> bool:
        return self.settings.canary_nodes > 0

    def wave_targets(self, wave: int | None = None) -> list[Target]:
        return [self.targets[n] for n in self.by_wave[self.wave if wave is None else wave]]

    def sent(self) -> list[Target]:
        """The nodes of every wave up to the current one."""
        return [t for w in range(min(self.wave + 1, len(self.by_wave))) for t in self.wave_targets(w)]

    def counts(self) -> Counter:
        return Counter(t.state for t in self.targets.values())


def node_state(status: ppb.ExecutorStatus, version: int) -> int:
    """Where the plan sent as ``version`` stands on one executor, from its planner's status."""
    if status.acked_plan.version >= version:
        return ACKED
    if status.state == ppb.PLAN_STATE_NACKED and status.last_result.plan_version >= version:
        return NACKED
    return PENDING if status.connected else UNREACHABLE


def observe(target: Target, status: ppb.ExecutorStatus) -> None:
    """Update a sent node from its status; ACKs and NACKs are final for the wave, an executor
    that is away may still come back before the wave ends."""
    if target.version and target.state in (PENDING, UNREACHABLE):
        target.state = node_state(status, target.version)
        target.reason = {NACKED: status.last_result.reason, UNREACHABLE: "not connected"}.get(target.state, "")


def expire(targets: list[Target], timeout_ms: int) -> None:
    """The wave's time is up: the nodes that did not answer count as unreachable."""
    for target in targets:
        if target.state == PENDING:  # a reason already given says why (its planner is away)
            target.state = UNREACHABLE
            target.reason = target.reason or f"no answer within {timeout_ms / 1000:g} s"


def new_rollout(rollout_id: str, request: fpb.StartRolloutRequest, settings: Settings,
                located: dict[str, tuple[str, ppb.ExecutorStatus]], now_ns: int) -> Rollout:
    """A rollout of ``located`` (node id -> its planner and status before the rollout)."""
    ids = sorted(located)
    targets = {}
    for wave, node_ids in enumerate(waves(ids, settings.canary_nodes, settings.wave_percents)):
        for node_id in node_ids:
            planner, status = located[node_id]
            targets[node_id] = Target(node_id, planner, wave, previous_of(status))
    return Rollout(rollout_id, request, settings, dict(sorted(targets.items())), started_ns=now_ns, updated_ns=now_ns)


def pause(rollout: Rollout, reason: str) -> None:
    """Stop before the next wave; the wave sent is still watched (and may still halt)."""
    _expect(rollout, (IN_PROGRESS,), "only a rollout in progress pauses")
    rollout.state, rollout.message = PAUSED, f"paused: {reason}" if reason else "paused by an operator"


def resume(rollout: Rollout) -> None:
    _expect(rollout, (PAUSED,), "only a paused rollout resumes")
    rollout.state, rollout.message = IN_PROGRESS, ""


def abort(rollout: Rollout, rollback: bool, reason: str) -> None:
    """End the rollout; with ``rollback`` the nodes it reached get their previous plans first."""
    _expect(rollout, (IN_PROGRESS, PAUSED), "only a rollout in progress or paused is aborted")
    rollout.state = ROLLING_BACK if rollback else ABORTED
    rollout.ends_as = ABORTED
    rollout.message = f"aborted: {reason}" if reason else "aborted by an operator"


def _expect(rollout: Rollout, states: tuple[int, ...], what: str) -> None:
    if rollout.state not in states:
        state = fpb.RolloutState.Name(rollout.state).removeprefix("ROLLOUT_STATE_")
        raise InvalidField("rollout_id", f"{rollout.rollout_id} is {state}: {what}")


class Decision(enum.Enum):
    WAIT = "wait"  # nodes of the wave have not answered
    WAVE_DONE = "wave done"  # the next wave may go (after the bake)
    HALT = "halt"  # too many failures: roll back
    SUCCEEDED = "succeeded"  # the last wave is done


def decide(rollout: Rollout, timed_out: bool) -> Decision:
    """After a look at the current wave (call ``expire`` first once ``timed_out``). NACKs halt at
    once; unreachable nodes count when the wave is over, since an executor away (or the planner it
    connects to, restarting) may return."""
    sent = rollout.sent()
    states = Counter(t.state for t in sent)
    canary = rollout.has_canary and rollout.wave == 0
    if _too_many(states[NACKED], len(sent), rollout.settings.max_failure_share, canary):
        return Decision.HALT
    if not timed_out and any(t.state in (PENDING, UNREACHABLE) for t in rollout.wave_targets()):
        return Decision.WAIT
    if _too_many(states[NACKED] + states[UNREACHABLE], len(sent), rollout.settings.max_failure_share, canary):
        return Decision.HALT
    return Decision.SUCCEEDED if rollout.wave + 1 >= len(rollout.by_wave) else Decision.WAVE_DONE


def _too_many(failed: int, sent: int, share: float, canary: bool) -> bool:
    return failed > 0 and (canary or failed > share * sent)


def failure_message(rollout: Rollout, halted: bool) -> str:
    """"halted at wave 2: 3 of 20 nodes failed (15% > 5%): edge-3 NACKed: <reason>; ..." """
    sent = rollout.sent()
    failed = [t for t in sent if t.state in (NACKED, UNREACHABLE)]
    share, limit = len(failed) / max(len(sent), 1), rollout.settings.max_failure_share
    canary = rollout.has_canary and rollout.wave == 0
    where = "the canary (wave 0)" if canary else f"wave {rollout.wave}"
    bound = "any failure halts the canary" if canary and halted else \
        f"{_percent(share)} {'>' if halted else '<='} {_percent(limit)}"
    named = "; ".join(f"{t.node_id} {'NACKed' if t.state == NACKED else 'unreachable'}"
                      + (f": {t.reason}" if t.reason else "") for t in failed[:NAMED_FAILURES])
    more = f"; and {len(failed) - NAMED_FAILURES} more" if len(failed) > NAMED_FAILURES else ""
    head = f"halted at {where}" if halted else "succeeded"
    return f"{head}: {len(failed)} of {len(sent)} nodes failed ({bound}): {named}{more}"


def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"


def rollback_pushes(rollout: Rollout) -> list[tuple[str, ppb.PushPlanRequest]]:
    """What gives every node the rollout reached its previous plan: a pinned plan is pushed
    pinned again, else a push without a plan unpins and replans; a budget rollout also restores
    each budget. Nodes that NACKed or are away are included: their planner still holds the
    rollout's plan for them and would send it when they return; so are nodes whose push failed
    on the way (it may have reached their planner). One push per planner and
    previous (plan, budget), node ids in order."""
    groups: dict[tuple, list[str]] = {}
    plans: dict[bytes, common_pb2.Plan] = {}
    restore_budget = rollout.request.budget_bytes > 0
    for target in rollout.targets.values():
        if target.state in (WAITING, ROLLED_BACK) or (not target.version and target.state == NACKED):
            continue  # never sent, rolled back already, or refused by its planner (which then pushes nothing)
        previous = target.previous
        plan_key = previous.plan.SerializeToString(deterministic=True) if previous.plan is not None else None
        if plan_key is not None:
            plans[plan_key] = previous.plan
        key = (target.planner, plan_key, previous.budget_bytes if restore_budget else 0)
        groups.setdefault(key, []).append(target.node_id)
    pushes = []
    for (planner, plan_key, budget), node_ids in sorted(groups.items(), key=lambda g: (g[0][0], g[1][0])):
        push = ppb.PushPlanRequest(node_ids=node_ids, budget_bytes=budget, view=ppb.STATUS_VIEW_BRIEF)
        if plan_key is not None:
            push.plan.CopyFrom(plans[plan_key])
        pushes.append((planner, push))
    return pushes


def rolled_back(rollout: Rollout, node_ids: list[str]) -> None:
    """A rollback push went through: the nodes that had acknowledged the rollout's plan, or had
    not answered it yet when the rollout halted, are rolled back (a late answer to the
    superseded plan changes nothing)."""
    for node_id in node_ids:
        target = rollout.targets[node_id]
        if target.state in (ACKED, PENDING):
            target.state = ROLLED_BACK
