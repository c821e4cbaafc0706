"""How many expert bytes one scoring actor may hold (``AccuracyRun.max_resident_bytes``).

Paper-size models hold most of their bytes in experts, and two actors must fit beside each
other. Under a cap, a random configuration is scored only if its slots fit (the planner never
chooses a plan over a device's budget, so larger ones are wasted work), while the full model,
the reference, is still scored exactly: on demand (``Strategy.ON_DEMAND``), which serves every
routed expert and loads misses in groups that fit the slots, so any capacity of at least one
slot per layer is exact, top-k routing included (a capacity under top-k only means more groups).
Pure functions over a ``ModelLayout``; 0 means no cap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from swapmoe.core.layout import ModelLayout
from swapmoe.core.plan import Strategy
from swapmoe.core.sizes import format_size


def checkpoint_layout(checkpoint: Path) -> ModelLayout:
    """The checkpoint's MoE layers as the runtime will have them, from the model built on the meta
    device (no weights read), so a driver can check a cap and choose configurations before any actor
    starts. Its ``dense_bytes`` leave out the buffers the runtime's routers add."""
    from swapmoe.executor.adapters import describe
    from swapmoe.executor.store_build import meta_model

    return describe(meta_model(Path(checkpoint)))


def full(layout: ModelLayout) -> tuple[int, ...]:
    return tuple(l.num_experts for l in layout.layers)


def minimum_bytes(layout: ModelLayout) -> int:
    """One slot per layer: the least any configuration holds."""
    return layout.expert_bytes((1,) * layout.num_layers)


def check_cap(layout: ModelLayout, cap: int) -> None:
    """ValueError unless ``cap`` (0: none) holds at least one slot per layer."""
    least = minimum_bytes(layout)
    if cap and cap < least:
        raise ValueError(f"max_resident_bytes {cap} ({format_size(cap)}) is below one expert slot per layer: "
                         f"this model needs at least {least} ({format_size(least)})")


def fits(layout: ModelLayout, experts_per_layer: Sequence[int], cap: int, precision: Sequence[str] = ()) -> bool:
    """Whether the slots fit ``cap`` with their experts at ``precision`` (per layer; empty: the checkpoint's)."""
    return not cap or layout.expert_bytes(experts_per_layer, precision) <= cap


def exact_capacities(layout: ModelLayout, cap: int) -> tuple[int, ...]:
    """Slots per layer for scoring the full model under ``cap``: the largest common fraction of
    every layer's experts whose bytes fit, at least one slot each (no layer starved for another)."""
    check_cap(layout, cap)
    if fits(layout, full(layout), cap):
        return full(layout)
    fractions = sorted({c / l.num_experts for l in layout.layers for c in range(1, l.num_experts + 1)}, reverse=True)
    for fraction in fractions:
        capacities = tuple(max(1, math.floor(fraction * l.num_experts + 1e-9)) for l in layout.layers)
        if fits(layout, capacities, cap):
            return capacities
    raise AssertionError("unreachable: one slot per layer fits a checked cap")


def scoring_residency(layout: ModelLayout, experts_per_layer: Sequence[int], cap: int,
                      precision: Sequence[str] = ()) -> tuple[tuple[int, ...], Strategy]:
    """The slots and strategy that score a configuration under ``cap``: its own slots with masked
    gating when they fit, the full model on demand in fewer slots; anything else is refused."""
    experts_per_layer = tuple(experts_per_layer)
    if fits(layout, experts_per_layer, cap, precision):
        return experts_per_layer, Strategy.MASKED_GATING
    if experts_per_layer == full(layout) and not any(precision):
        return exact_capacities(layout, cap), Strategy.ON_DEMAND
    size = layout.expert_bytes(experts_per_layer, precision)
    raise ValueError(f"configuration {experts_per_layer} holds {size} bytes of experts ({format_size(size)}), "
                     f"over max_resident_bytes {cap} ({format_size(cap)})")
