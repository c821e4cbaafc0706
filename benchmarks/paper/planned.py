"""The planner's plans for the bundled LM, as the planner service searches them: its shipped
profile (``models/profiles``), its objectives and its genetic search, at a budget given as a
share of all experts (the bytes of that many experts; equal-sized experts make any split cost
the same)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from swapmoe.core.plan import Strategy
from swapmoe.planner_service.search import search

from benchmarks.planning_bundled import Bundled, budget_for, even, experts_at, load_bundled


@dataclass(frozen=True)
class Planned:
    share: float
    experts: int  # in all layers
    budget_bytes: int
    experts_per_layer: tuple[int, ...]
    update_frequency: int
    strategy: str  # the planner's own choice, all strategies open
    predicted_accuracy: float

    def to_json(self) -> dict:
        return dict(share=self.share, experts=self.experts, budget_bytes=self.budget_bytes,
                    experts_per_layer=list(self.experts_per_layer), update_frequency=self.update_frequency,
                    strategy=self.strategy, predicted_accuracy=self.predicted_accuracy)


@lru_cache(maxsize=1)
def bundled() -> Bundled:
    return load_bundled()


def capacity() -> tuple[int, ...]:
    return bundled().capacity


def plan(share: float, workload: str = "mix") -> Planned:
    """The planner's virtual-experts plan at ``share`` of all experts for ``workload`` (one of the
    profile's: code, prose, manual, mix), and which strategy it picks with on-demand open too."""
    b = bundled()
    total = max(len(b.capacity), experts_at(share, b.capacity))
    budget = budget_for(b.memory, total)
    objectives = b.objectives[workload]
    found = search(_masked(objectives), budget, b.service)
    chosen = search(objectives, budget, b.service)
    return Planned(share, total, budget, found.experts_per_layer, found.update_frequency, chosen.strategy.value,
                   float(found.predicted.accuracy))


def even_split(share: float) -> tuple[int, ...]:
    """The paper's "simple planning": the same number of experts in every layer."""
    cap = capacity()
    return even(max(len(cap), experts_at(share, cap)), cap)


def workloads() -> tuple[str, ...]:
    return tuple(bundled().objectives)


def _masked(objectives):
    import dataclasses
    return dataclasses.replace(objectives, strategies=(Strategy.MASKED_GATING,))
