"""What an executor's messages must satisfy before the planner acts on them.

Every check here runs on the stream's own thread before the registry's lock is taken, so a
hostile registration (2^32 experts, a budget of 2^64 bytes, a plan version of 2^64) costs
one bounded check and an INVALID_ARGUMENT, never a wedged planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from swapmoe.core import limits
from swapmoe.core.budget import MemoryModel
from swapmoe.core.errors import InvalidField
from swapmoe.core.labels import check_labels
from swapmoe.core.layout import validate_layout
from swapmoe.core.plan import Plan, validate_plan
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, planner_pb2 as ppb


@dataclass(frozen=True, slots=True)
class Registered:
    """A checked registration: the memory model its plans are sized with and the plan it runs
    (None for a registration that carries no plan)."""

    registration: ppb.Registration
    memory: MemoryModel
    current: Plan | None


def check_registration(reg: ppb.Registration) -> Registered:
    """Raise InvalidField (naming ``registration.<field>``) unless every field is within bounds."""
    limits.check_node_id("registration.node_id", reg.node_id)
    limits.check_text("registration.node_secret", reg.node_secret)
    limits.check_text("registration.executor_address", reg.executor_address)
    check_labels("registration.labels", reg.labels)
    for name in ("kind", "name", "hostname"):
        limits.check_text(f"registration.device.{name}", getattr(reg.device, name))
    limits.check_range("registration.device.memory_bytes", reg.device.memory_bytes, 0, limits.MAX_BYTES)
    for name in ("staging_bytes", "kv_cache_bytes", "activation_bytes"):
        limits.check_range(f"registration.reserve.{name}", getattr(reg.reserve, name), 0, limits.MAX_BYTES)
    limits.check_count("registration.layout.layers", reg.layout.layers, limits.MAX_LAYERS)
    layout = convert.layout_from_pb(reg.layout)
    try:
        validate_layout(layout)
        memory = MemoryModel(layout, convert.reserve_from_pb(reg.reserve), reg.device.memory_bytes)
        memory.check_budget(reg.budget_bytes)
        current = convert.plan_from_pb(reg.current_plan) if reg.HasField("current_plan") else None
        if current is not None:
            validate_plan(current, layout)
    except InvalidField as error:
        raise error.under("registration") from None
    return Registered(reg, memory, current)


def check_budget_change(memory: MemoryModel, change: ppb.BudgetChange) -> None:
    try:
        memory.check_budget(change.budget_bytes)
    except InvalidField as error:
        raise error.under("budget_change") from None
    limits.check_text("budget_change.reason", change.reason, limits.MAX_REASON_CHARS)


def check_result(result: common_pb2.PlanResult) -> None:
    limits.check_range("plan_result.plan_version", result.plan_version, 0, limits.MAX_PLAN_VERSION)
    limits.check_text("plan_result.reason", result.reason, limits.MAX_REASON_CHARS)
    limits.check_count("plan_result.achieved_experts_per_layer", result.achieved_experts_per_layer,
                       limits.MAX_LAYERS)
