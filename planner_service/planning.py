"""Choosing plans. Until the search lands, an executor gets the default plan (an even split
of its budget) computed with the same ``MemoryModel`` the executor checks plans with."""

from __future__ import annotations

from swapmoe.core.budget import MemoryModel
from swapmoe.core.plan import Plan
from swapmoe.core.sizes import format_size


def plan_for(memory: MemoryModel, budget_bytes: int, version: int) -> Plan:
    """The most experts per layer that fit the budget, spread evenly."""
    return memory.default_plan(budget_bytes, version, f"planner:even-split budget={format_size(budget_bytes)}")
