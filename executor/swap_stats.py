"""What virtual experts report of their swapping: counters, and each layer's routing and residency."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SwapStats:
    updates: int = 0
    loads_started: int = 0  # background loads: amortized updates' and prefetches'
    loads_finished: int = 0
    evictions: int = 0
    on_demand_loads: int = 0  # synchronous: a pass waited for the read
    failed_loads: int = 0
    prefetch_loads: int = 0  # of loads_started, those on-demand prefetching started (a guess)
    prefetch_hits: int = 0  # needed experts a prefetch had made resident or had in flight
    prefetch_cancelled: int = 0  # of prefetch_loads, those cancelled before they started (never read)
    prefetch_waits: int = 0  # times a pass waited for a prefetch of an expert it needed (in flight)
    prefetch_wasted_waits: int = 0  # times it waited for one it did not need (no other slot to load into)
    prefetch_wait_s: float = 0.0  # the forward thread's time in those waits


@dataclass(frozen=True, slots=True)
class LayerActivity:
    """One layer's cumulative routing (by the unmasked router: what tokens wanted) and the
    experts resident now; readers subtract two readings for what happened between."""

    activations: list[int]
    importance: list[float]
    resident: list[int]
