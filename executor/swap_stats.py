"""What virtual experts report of their swapping: counters, and each layer's routing and residency."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SwapStats:
    updates: int = 0
    loads_started: int = 0
    loads_finished: int = 0
    evictions: int = 0
    on_demand_loads: int = 0
    failed_loads: int = 0


@dataclass(frozen=True, slots=True)
class LayerActivity:
    """One layer's cumulative routing (by the unmasked router: what tokens wanted) and the
    experts resident now; readers subtract two readings for what happened between."""

    activations: list[int]
    importance: list[float]
    resident: list[int]
