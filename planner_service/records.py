"""One executor as the planner knows it, its status as the wire shows it, and a profile asked of it.

Plain records: the registry (``registry.py``) changes them under its lock, the state database
(``state.py``) stores them, and the status RPCs turn them into ``ExecutorStatus`` here.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

from swapmoe.core.budget import MemoryModel
from swapmoe.core.plan import Plan
from swapmoe.planner_service.outbox import Outbox
from swapmoe.planner_service.search import Found
from swapmoe.profiler.performance_models import lower_is_better
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, executor_pb2 as epb, planner_pb2 as ppb, telemetry_pb2 as tpb


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class ExecutorRecord:
    node_id: str
    registration: ppb.Registration  # as registered, without its secret
    memory_model: MemoryModel
    budget_bytes: int = 0  # the budget in force, as the planner knows it (0: the registered one)
    connected: bool = True
    desired: Plan | None = None
    acked: Plan | None = None
    state: int = ppb.PLAN_STATE_UNSPECIFIED
    pinned: bool = False  # desired is an operator's plan
    last_result: common_pb2.PlanResult | None = None
    memory: common_pb2.MemoryReport | None = None
    last_seen_ns: int = 0
    version: int = 0  # highest plan version this executor has seen
    secret_digest: str = ""  # sha256 of the secret issued to this node id
    claimed: bool = False  # the executor answered after its secret was sent: later claims must prove it
    away_since_ns: int = 0  # when its stream ended (or the planner started, for a record read back); 0: connected
    # What to send: the newest plan, profile messages (PlannerMessage); bounded.
    outbox: Outbox = field(default_factory=Outbox)
    profiles: dict[str, "PendingProfile"] = field(default_factory=dict)  # asked, not answered yet
    workload: str = ""  # recognised from expert telemetry ("" until then)
    reason: str = ""  # why desired was sent
    found: Found | None = None  # what the search predicted for desired (None: not searched)
    throughput: tpb.ThroughputReport | None = None  # last measured
    budget_before: int = 0  # the budget before a pushed plan that carries one, until it is answered

    def __post_init__(self):
        self.budget_bytes = self.budget_bytes or self.registration.budget_bytes

    @property
    def layout(self):
        return self.memory_model.layout

    def to_pb(self, profile_state: str = "", brief: bool = False) -> ppb.ExecutorStatus:
        """The status; ``brief`` leaves out the layout, device, memory report and prediction."""
        reg = self.registration
        msg = ppb.ExecutorStatus(node_id=self.node_id, connected=self.connected, budget_bytes=self.budget_bytes,
                                 state=self.state, last_seen_ns=self.last_seen_ns, pinned=self.pinned,
                                 workload=self.workload, reason=self.reason, profile_state=profile_state,
                                 labels=reg.labels, executor_address=reg.executor_address)
        if not brief:
            msg.layout.CopyFrom(reg.layout)
            msg.device.CopyFrom(reg.device)
            if self.found is not None and not self.pinned:
                msg.predicted.CopyFrom(prediction_to_pb(self.found))
            if self.memory:
                msg.memory.CopyFrom(self.memory)
        if self.throughput is not None:
            msg.throughput.CopyFrom(self.throughput)
        if self.desired:
            msg.desired_plan.CopyFrom(convert.plan_to_pb(self.desired))
        if self.acked:
            msg.acked_plan.CopyFrom(convert.plan_to_pb(self.acked))
        if self.last_result:
            msg.last_result.CopyFrom(self.last_result)
        return msg


def prediction_to_pb(found: Found) -> ppb.PlanPrediction:
    metric = "perplexity" if lower_is_better(found.workload) else "rouge2"
    return ppb.PlanPrediction(workload=found.workload, accuracy=found.predicted.accuracy, accuracy_metric=metric,
                              inter_token_ns=int(found.predicted.inter_token_ns),
                              tokens_per_second=found.predicted.tokens_per_second,
                              memory_bytes=found.predicted.memory_bytes, budget_bytes=found.budget_bytes,
                              offered_load=found.offered_load, throughput=found.predicted.throughput)


@dataclass
class PendingProfile:
    """A profile asked of one executor: ``done`` is set once it has an outcome or a failure."""

    node_id: str
    request_id: str
    done: threading.Event = field(default_factory=threading.Event)
    outcome: ppb.ProfileOutcome | None = None  # the executor's answer
    failure: str = ""  # why no answer will come (the stream ended)

    def finish(self, outcome: ppb.ProfileOutcome | None, failure: str = "") -> None:
        self.outcome, self.failure = outcome, failure
        self.done.set()

    def result(self, timeout_s: float) -> epb.ProfileResult:
        """The profile, waited for; raises TimeoutError, or RuntimeError saying why none came."""
        if not self.done.wait(timeout_s):
            raise TimeoutError(f"no profile within {timeout_s:g} s")
        if self.outcome is None or self.outcome.error:
            raise RuntimeError(self.failure or self.outcome.error)
        return self.outcome.result



def count(summary: ppb.StatusSummary, record: ExecutorRecord) -> None:
    summary.total += 1
    summary.connected += record.connected
    summary.pinned += record.pinned
    if record.desired is None:
        summary.unplanned += 1
    elif record.state == ppb.PLAN_STATE_PENDING:
        summary.pending += 1
    elif record.state == ppb.PLAN_STATE_ACKED:
        summary.acked += 1
    elif record.state == ppb.PLAN_STATE_NACKED:
        summary.nacked += 1
