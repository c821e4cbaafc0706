"""Plans for every budget (issue: a budget change answered at once).

When a profile loads, the search runs at budgets spread over the model's range, from one
expert per layer and one sequence (the executor's minimum budget) to every expert beside a full
batch, each seeded with the plan found for the budget below. A frontier is searched for one
workload at one offered load (``Service``): the rows it pays for depend on that load. A
budget is then answered from the largest searched budget that fits it, in microseconds,
while a search at the exact budget may follow and join the frontier.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from swapmoe.profiler import artifacts

from swapmoe.planner_service.objectives import Objectives, Service
from swapmoe.planner_service.search import Found, SearchSettings, least_bytes, search

MAX_POINTS = 16  # budgets searched when a frontier is built
FORMAT = 3  # of stored frontiers: 2 searched rows with experts, 3 precision (older ones are searched again)
log = logging.getLogger(__name__)


@dataclass
class Frontier:
    """Searched plans of one (executor, workload, offered load), ascending by budget."""

    workload: str
    service: Service
    points: list[Found] = field(default_factory=list)

    def at(self, budget_bytes: int) -> Found | None:
        """The plan of the largest searched budget within ``budget_bytes`` (None: none fits)."""
        index = bisect.bisect_right([p.budget_bytes for p in self.points], budget_bytes)
        return self.points[index - 1] if index else None

    def add(self, found: Found) -> None:
        budgets = [p.budget_bytes for p in self.points]
        index = bisect.bisect_left(budgets, found.budget_bytes)
        if index < len(budgets) and budgets[index] == found.budget_bytes:
            self.points[index] = found
        else:
            self.points.insert(index, found)

    def to_json(self) -> dict:
        return dict(workload=self.workload, offered_load=self.service.offered_load,
                    latency_target_ns=self.service.latency_target_ns,
                    throughput_target=self.service.throughput_target, points=[p.to_json() for p in self.points])

    @classmethod
    def from_json(cls, body: dict) -> "Frontier":
        target = body["latency_target_ns"]
        service = Service(int(body.get("offered_load", 1)), None if target is None else float(target),
                          float(body.get("throughput_target", 0.0)))
        return cls(str(body["workload"]), service, [Found.from_json(p) for p in body["points"]])

    @property
    def key(self) -> str:
        return key(self.workload, self.service.offered_load)


def key(workload: str, offered_load: int) -> str:
    """How an executor's frontiers are told apart (and stored): workload and offered load."""
    return f"{workload}@{offered_load}"


def budgets(objectives: Objectives, points: int = MAX_POINTS) -> list[int]:
    """Budgets spread evenly from the least a plan needs (one expert per layer, one sequence) to
    the full model beside a full batch, ``points`` of them at most."""
    memory = objectives.memory
    low, high = least_bytes(objectives), memory.plan_bytes(objectives.num_experts)
    return sorted({int(b) for b in np.linspace(low, high, max(2, points))})


def build(objectives: Objectives, service: Service, settings: SearchSettings = SearchSettings(),
          points: int = MAX_POINTS) -> Frontier:
    """Search every budget of ``budgets``, smallest first, each seeded with the one below it
    (``service`` with its latency target set: the planner resolves the default first)."""
    frontier = Frontier(objectives.workload, service)
    for budget in budgets(objectives, points):
        frontier.add(search(objectives, budget, service, settings, frontier.points[-1:]))
    return frontier


# --- kept in the planner's state directory ------------------------------------------------
def node_key(fingerprint: str, accuracy_digest: str, device, memory) -> str:
    """Stored frontiers are valid for one model, accuracy profile, device profile and memory model."""
    reserve = memory.reserve
    text = json.dumps([FORMAT, fingerprint, accuracy_digest, device.node_id, device.decode_step_ns, memory.fixed_bytes,
                       reserve.sequence_bytes, [l.bytes_per_expert for l in memory.layout.layers],
                       [l.precisions for l in memory.layout.layers]])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def save(path: Path, key: str, frontiers: dict[str, Frontier]) -> None:
    artifacts.write_json(path, "frontiers", dict(key=key, frontiers=[f.to_json() for f in frontiers.values()]))


def load(path: Path, workloads) -> dict[str, Frontier]:
    """The frontiers stored at ``path`` for ``workloads`` (none when missing or unreadable: searched again)."""
    if not path.exists():
        return {}
    try:
        body = artifacts.read_json(path, "frontiers")
        loaded = [Frontier.from_json(f) for f in body["frontiers"]]
    except (artifacts.ProfileError, OSError, KeyError, TypeError, ValueError) as error:
        log.warning("ignoring stored frontiers %s: %s", path, error)
        return {}
    return {f.key: f for f in loaded if f.workload in workloads}
