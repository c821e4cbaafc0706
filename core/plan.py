"""A virtual-experts plan and its validation against a model layout.

A plan says how many experts each MoE layer keeps resident (its virtual-expert
slots), how often the resident set is updated, and what happens to tokens routed
to an absent expert (paper sections 3.1-3.3). It is one dataclass everywhere;
``swapmoe.rpc.convert`` is the only place it meets its proto; how many experts fit a
budget is ``swapmoe.core.budget``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import ModelLayout
from swapmoe.core.limits import (MAX_BYTES, MAX_PLAN_VERSION, MAX_ROWS, MAX_UPDATE_FREQUENCY, check_range,
                                 check_text)
from swapmoe.core.memory import MemoryReport


class Strategy(enum.Enum):
    """How a token routed to a non-resident expert is served: re-routed among the resident
    experts (masked gating, Fig. 5), dropped (skip), or served after a synchronous load
    (on demand: exact, the LRU baseline)."""

    MASKED_GATING = "masked_gating"
    SKIP = "skip"
    ON_DEMAND = "on_demand"


# Tokens between resident-set updates in a default plan, until profiling picks one.
DEFAULT_UPDATE_FREQUENCY = 4


@dataclass(frozen=True, slots=True)
class Plan:
    version: int
    experts_per_layer: tuple[int, ...]
    update_frequency: int = 0
    strategy: Strategy = Strategy.MASKED_GATING
    origin: str = ""
    budget_bytes: int = 0  # a budget to set with the plan (a fleet-wide budget policy); 0 keeps it
    # Sequences decoded together at most (batch rows): what the plan's bytes leave room for beside
    # its experts. 0: as many as the budget holds. The executor's --max-batch bounds it either way.
    rows: int = 0
    # Per layer, the precision its resident experts are held at ("": the checkpoint's; see
    # executor.quantization). Empty: the checkpoint's in every layer.
    precision: tuple[str, ...] = ()

    @property
    def precisions(self) -> tuple[str, ...]:
        """``precision`` with one entry per layer ("" where the plan names none)."""
        return self.precision or ("",) * len(self.experts_per_layer)

    def with_version(self, version: int) -> "Plan":
        return dataclasses.replace(self, version=version)

    def with_budget(self, budget_bytes: int) -> "Plan":
        return dataclasses.replace(self, budget_bytes=budget_bytes)


def validate_plan(plan: Plan, layout: ModelLayout) -> None:
    """Raise InvalidField when ``plan`` cannot run on ``layout`` (memory is checked by the engine)."""
    check_range("plan.version", plan.version, 0, MAX_PLAN_VERSION)
    check_range("plan.update_frequency", plan.update_frequency, 0, MAX_UPDATE_FREQUENCY)
    check_text("plan.origin", plan.origin)
    check_range("plan.budget_bytes", plan.budget_bytes, 0, MAX_BYTES)
    check_range("plan.rows", plan.rows, 0, MAX_ROWS)
    if len(plan.experts_per_layer) != layout.num_layers:
        raise InvalidField(
            "plan.experts_per_layer",
            f"has {len(plan.experts_per_layer)} entries but the model has {layout.num_layers} MoE layers",
        )
    for layer, (kept, spec) in enumerate(zip(plan.experts_per_layer, layout.layers)):
        if not 1 <= kept <= spec.num_experts:
            raise InvalidField(
                f"plan.experts_per_layer[{layer}]",
                f"keeps {kept} experts; layer {layer} has {spec.num_experts} (allowed: 1 to {spec.num_experts})",
            )
    if plan.precision and len(plan.precision) != layout.num_layers:
        raise InvalidField("plan.precision", f"has {len(plan.precision)} entries but the model has "
                                             f"{layout.num_layers} MoE layers (or none: the checkpoint's)")
    for layer, (precision, spec) in enumerate(zip(plan.precision, layout.layers)):
        check_text(f"plan.precision[{layer}]", precision)
        if precision and precision not in dict(spec.precisions):
            kept = ", ".join(['"" (the checkpoint\'s ' + layout.dtype + ")", *dict(spec.precisions)])
            raise InvalidField(f"plan.precision[{layer}]", f"{precision!r} is not a precision layer {layer}'s "
                                                           f"experts are kept at (it has {kept})")


@dataclass(frozen=True, slots=True)
class PlanResult:
    """An executor's answer to a plan: ACK (``accepted``) with what was achieved, or NACK with why."""

    plan_version: int
    accepted: bool
    reason: str = ""
    achieved_experts_per_layer: tuple[int, ...] = ()
    memory: MemoryReport | None = None
    apply_ns: int = 0
    achieved_rows: int = 0  # sequences the executor decodes together under the plan (ACK only)


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """A budget set on the device itself (``SetBudget``, an operator, the OS), not by a plan:
    the planner hears of it as a message of its own and plans for the new budget."""

    previous_bytes: int
    budget_bytes: int
    reason: str = ""
