"""Choosing plans. The walking skeleton splits the budget evenly across layers;
the search issue replaces this with performance models and a genetic search."""

from __future__ import annotations

from swapmoe.layout import ModelLayout
from swapmoe.plan import Plan, Strategy, even_split
from swapmoe.sizes import format_size


def reserve_bytes(layout: ModelLayout, min_budget_bytes: int) -> int:
    """KV-cache and activation reserve, recovered from the executor's minimum budget
    (dense + one expert per layer + reserve)."""
    return max(0, min_budget_bytes - layout.dense_bytes - layout.expert_bytes([1] * layout.num_layers))


DEFAULT_UPDATE_FREQUENCY = 4  # tokens between resident-set updates, until profiling picks one


def even_split_plan(layout: ModelLayout, budget_bytes: int, min_budget_bytes: int, version: int) -> Plan:
    """The most experts per layer that fit the budget, spread evenly, updated every few tokens."""
    available = budget_bytes - layout.dense_bytes - reserve_bytes(layout, min_budget_bytes)
    return Plan(
        version=version,
        experts_per_layer=even_split(layout, available),
        update_frequency=DEFAULT_UPDATE_FREQUENCY,
        strategy=Strategy.MASKED_GATING,
        origin=f"planner:even-split budget={format_size(budget_bytes)}",
    )
