"""Plans for every budget (issue: a budget change answered at once).

When a profile loads, the search runs at budgets spread over the model's range, from one
expert per layer to every expert, each seeded with the plan found for the budget below. A
budget is then answered from the largest searched budget that fits it, in microseconds,
while a search at the exact budget may follow and join the frontier.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
import numpy as np

from swapmoe.planner_service.objectives import Objectives
from swapmoe.planner_service.search import Found, SearchSettings, search

MAX_POINTS = 16  # budgets searched when a frontier is built


@dataclass
class Frontier:
    """Searched plans of one (executor, workload), ascending by budget."""

    workload: str
    latency_target_ns: float
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
        return dict(workload=self.workload, latency_target_ns=self.latency_target_ns,
                    points=[p.to_json() for p in self.points])

    @classmethod
    def from_json(cls, body: dict) -> "Frontier":
        return cls(str(body["workload"]), float(body["latency_target_ns"]),
                   [Found.from_json(p) for p in body["points"]])


def budgets(objectives: Objectives, points: int = MAX_POINTS) -> list[int]:
    """Budgets spread evenly over the expert bytes a plan can hold: the smallest plan (one expert
    per layer, beside a full batch) to the full model, ``points`` of them at most."""
    memory = objectives.memory
    low, high = memory.smallest_plan_bytes, memory.plan_bytes(objectives.num_experts)
    return sorted({int(b) for b in np.linspace(low, high, max(2, points))})


def build(objectives: Objectives, latency_target_ns: float, settings: SearchSettings = SearchSettings(),
          points: int = MAX_POINTS) -> Frontier:
    """Search every budget of ``budgets``, smallest first, each seeded with the one below it."""
    frontier = Frontier(objectives.workload, latency_target_ns)
    for budget in budgets(objectives, points):
        frontier.add(search(objectives, budget, latency_target_ns, settings, frontier.points[-1:]))
    return frontier
