"""Virtual-expert slots of one MoE layer: plain bookkeeping, no tensors, no threads.

A layer owns ``capacity`` slots. Each slot is free, loading an expert (reserved: a
background copy is writing it, so no forward pass may read it), or holding a ready
expert. The resident set moves toward the most important experts a bounded number
of loads at a time (paper section 3.2, amortized loading). With a spare slot, a
load never takes an expert away before its replacement is ready; without one, the
least important resident expert is evicted first so its slot can be refilled.

The slot pool is to experts what a block manager is to KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(slots=True)
class SlotPool:
    num_experts: int
    capacity: int
    ready: dict[int, int] = field(default_factory=dict)  # expert -> slot, usable by forward passes
    loading: dict[int, int] = field(default_factory=dict)  # expert -> slot, being written
    free: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not 1 <= self.capacity:
            raise ValueError(f"a layer needs at least one slot, got {self.capacity}")
        if not self.free and not self.ready and not self.loading:
            self.free = list(range(self.capacity))

    @property
    def resident(self) -> list[int]:
        return sorted(self.ready)

    def slot_of(self, expert: int) -> int | None:
        return self.ready.get(expert)

    def wanted(self, scores: Sequence[float], target: int) -> list[int]:
        """The ``target`` most important experts (ties: lower index first)."""
        order = sorted(range(self.num_experts), key=lambda e: (-scores[e], e))
        return order[:target]

    def begin_loads(self, scores: Sequence[float], target: int, max_loads: int) -> list[tuple[int, int]]:
        """Reserve slots for up to ``max_loads`` wanted experts that are absent; returns (expert, slot).

        ``target`` resident experts is the goal (at most ``capacity``). A slot comes from the free
        list, else from evicting the least important resident expert that is not wanted.
        """
        target = min(target, self.capacity)
        wanted = self.wanted(scores, target)
        missing = [e for e in wanted if e not in self.ready and e not in self.loading]
        started = []
        for expert in missing[:max_loads]:
            if not self.free:
                victims = self._victims(scores, wanted)
                if not victims:
                    break
                self.evict(victims[0])
            slot = self.free.pop(0)
            self.loading[expert] = slot
            started.append((expert, slot))
        return started

    def finish_load(self, expert: int, scores: Sequence[float], target: int) -> list[int]:
        """The load of ``expert`` completed: make it usable, then evict down to ``target``
        resident experts (least important first). Returns the experts evicted."""
        self.ready[expert] = self.loading.pop(expert)
        wanted = self.wanted(scores, min(target, self.capacity))
        evicted = []
        while len(self.ready) > target:
            victims = self._victims(scores, wanted) or self._victims(scores, [])
            self.evict(victims[0])
            evicted.append(victims[0])
        return evicted

    def cancel_load(self, expert: int) -> None:
        self.free.append(self.loading.pop(expert))

    def evict(self, expert: int) -> None:
        self.free.append(self.ready.pop(expert))

    def fill(self, experts: Sequence[int]) -> list[tuple[int, int]]:
        """Reserve slots for ``experts`` at start-up (no eviction); returns (expert, slot)."""
        if len(experts) > len(self.free):
            raise ValueError(f"{len(experts)} experts do not fit {len(self.free)} free slots")
        out = [(e, self.free.pop(0)) for e in experts]
        self.loading.update(out)
        return out

    def shrink(self, capacity: int, scores: Sequence[float]) -> dict[int, int]:
        """Keep the ``capacity`` most important ready experts in slots renumbered 0..n-1, cancel
        loads in flight. Returns {old slot: new slot} for the experts kept (the caller copies them)."""
        self.loading.clear()
        keep = sorted(self.ready, key=lambda e: (-scores[e], e))[:capacity]
        by_slot = sorted(keep, key=lambda e: self.ready[e])
        moves = {self.ready[e]: new for new, e in enumerate(by_slot)}
        self.ready = {e: new for new, e in enumerate(by_slot)}
        self.capacity = capacity
        self.free = list(range(len(keep), capacity))
        return moves

    def grow(self, capacity: int) -> list[int]:
        """Add free slots numbered after the existing ones; returns the new slot numbers."""
        new = list(range(self.capacity, capacity))
        self.free += new
        self.capacity = max(self.capacity, capacity)
        return new

    def _victims(self, scores: Sequence[float], wanted: Sequence[int]) -> list[int]:
        keep = set(wanted)
        return sorted((e for e in self.ready if e not in keep), key=lambda e: (scores[e], e))

