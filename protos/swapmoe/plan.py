"""A virtual-experts plan and its validation against a model layout.

A plan says how many experts each MoE layer keeps resident (its virtual-expert
slots), how often the resident set is updated, and what happens to tokens routed
to an absent expert (paper sections 3.1-3.3). It is one dataclass everywhere;
``swapmoe.convert`` is the only place it meets its proto.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from swapmoe.layout import ModelLayout
from swapmoe.memory import MemoryReport


class Strategy(enum.Enum):
    """How a token routed to a non-resident expert is served."""

    MASKED_GATING = "masked_gating"
    SKIP = "skip"
    ON_DEMAND = "on_demand"


class InvalidField(ValueError):
    """A request field is invalid; ``field`` names it (e.g. ``plan.experts_per_layer[3]``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Plan:
    version: int
    experts_per_layer: tuple[int, ...]
    update_frequency: int = 0
    strategy: Strategy = Strategy.MASKED_GATING
    origin: str = ""

    def with_version(self, version: int) -> "Plan":
        return Plan(version, self.experts_per_layer, self.update_frequency, self.strategy, self.origin)


def validate_plan(plan: Plan, layout: ModelLayout) -> None:
    """Raise InvalidField when ``plan`` cannot run on ``layout`` (memory is checked by the engine)."""
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
    if plan.update_frequency < 0:
        raise InvalidField("plan.update_frequency", "must not be negative")


def even_split(layout: ModelLayout, expert_bytes_available: int) -> tuple[int, ...]:
    """Experts per layer that fit ``expert_bytes_available``, spread as evenly as possible.

    Every layer keeps at least one expert (a layer with none cannot route), so
    the result may exceed the bytes given when they cannot hold one per layer;
    callers compare against the minimum budget first.
    """
    counts = [1] * layout.num_layers
    used = layout.expert_bytes(counts)
    grew = True
    while grew:  # round-robin: one more expert per layer while it fits
        grew = False
        for i, spec in enumerate(layout.layers):
            if counts[i] < spec.num_experts and used + spec.bytes_per_expert <= expert_bytes_available:
                counts[i] += 1
                used += spec.bytes_per_expert
                grew = True
    return tuple(counts)


@dataclass(frozen=True, slots=True)
class PlanResult:
    """An executor's answer to a plan: ACK (``accepted``) with what was achieved, or NACK with why."""

    plan_version: int
    accepted: bool
    reason: str = ""
    achieved_experts_per_layer: tuple[int, ...] = ()
    memory: MemoryReport | None = None
    apply_ns: int = 0

