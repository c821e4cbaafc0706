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

from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence


@dataclass(slots=True)
class SlotPool:
    """The slots of one layer and which expert each holds; the only writer of that state.

    Others read ``ready``, ``loading`` and ``free`` (read-only views) and change them only
    through the methods below. Hits and misses count on-demand lookups (``touch``)."""

    num_experts: int
    capacity: int
    _ready: dict[int, int] = field(default_factory=dict, init=False)  # expert -> slot, usable by forward passes
    _loading: dict[int, int] = field(default_factory=dict, init=False)  # expert -> slot, being written
    _free: list[int] = field(default_factory=list, init=False)
    # Ready experts, least recently used first (the on-demand strategy evicts from the front).
    _recency: OrderedDict = field(default_factory=OrderedDict, init=False)
    # Experts whose stored copy is damaged: never wanted again, so their slots go to the next ones.
    _damaged: set = field(default_factory=set, init=False)
    # Loading experts that are a guess (on-demand prefetch) -> the expert evicted for its slot (None: it was free).
    _guesses: dict = field(default_factory=dict, init=False)
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)

    def __post_init__(self):
        if not 1 <= self.capacity:
            raise ValueError(f"a layer needs at least one slot, got {self.capacity}")
        self._free = list(range(self.capacity))

    @property
    def ready(self) -> Mapping[int, int]:
        return MappingProxyType(self._ready)

    @property
    def loading(self) -> Mapping[int, int]:
        return MappingProxyType(self._loading)

    @property
    def free(self) -> tuple[int, ...]:
        return tuple(self._free)

    @property
    def resident(self) -> list[int]:
        return sorted(self._ready)

    def slot_of(self, expert: int) -> int | None:
        return self._ready.get(expert)

    @property
    def damaged(self) -> frozenset[int]:
        return frozenset(self._damaged)

    def wanted(self, scores: Sequence[float], target: int) -> list[int]:
        """The ``target`` most important experts that can be loaded (ties: lower index first)."""
        order = sorted((e for e in range(self.num_experts) if e not in self._damaged), key=lambda e: (-scores[e], e))
        return order[:target]

    def begin_loads(self, scores: Sequence[float], target: int, max_loads: int) -> list[tuple[int, int]]:
        """Reserve slots for up to ``max_loads`` wanted experts that are absent; returns (expert, slot).

        ``target`` resident experts is the goal (at most ``capacity``). A slot comes from the free
        list, else from evicting the least important resident expert that is not wanted.
        """
        target = min(target, self.capacity)
        wanted = self.wanted(scores, target)
        missing = [e for e in wanted if e not in self._ready and e not in self._loading]
        started = []
        for expert in missing[:max_loads]:
            if not self._free:
                victims = self._victims(scores, wanted)
                if not victims:
                    break
                self.evict(victims[0])
            started.append((expert, self._reserve(expert)))
        return started

    def finish_load(self, expert: int, scores: Sequence[float], target: int) -> list[int]:
        """The load of ``expert`` completed: make it usable, then evict down to ``target``
        resident experts (least important first). Returns the experts evicted."""
        self._commit(expert)
        wanted = self.wanted(scores, min(target, self.capacity))
        evicted = []
        while len(self._ready) > target:
            victims = self._victims(scores, wanted) or self._victims(scores, [])
            self.evict(victims[0])
            evicted.append(victims[0])
        return evicted

    def cancel_load(self, expert: int) -> None:
        """The load of ``expert`` will not complete: its slot is free again."""
        self._free.append(self._loading.pop(expert))
        self._guesses.pop(expert, None)

    def set_aside(self, expert: int) -> None:
        """``expert`` cannot be loaded (its stored copy is damaged): never start a load of it again.
        A copy already resident stays: it was checked when it was loaded."""
        self._damaged.add(expert)

    def evict(self, expert: int) -> None:
        self._free.append(self._ready.pop(expert))
        self._recency.pop(expert, None)

    def fill(self, experts: Sequence[int]) -> list[tuple[int, int]]:
        """Reserve slots for ``experts`` at start-up (no eviction); returns (expert, slot)."""
        if len(experts) > len(self._free):
            raise ValueError(f"{len(experts)} experts do not fit {len(self._free)} free slots")
        return [(e, self._reserve(e)) for e in experts]

    def shrink(self, capacity: int, scores: Sequence[float]) -> dict[int, int]:
        """Keep the ``capacity`` most important ready experts in slots renumbered 0..n-1, cancel
        loads in flight. Returns {old slot: new slot} for the experts kept (the caller copies them)."""
        self._loading.clear()
        self._guesses.clear()
        keep = sorted(self._ready, key=lambda e: (-scores[e], e))[:capacity]
        by_slot = sorted(keep, key=lambda e: self._ready[e])
        moves = {self._ready[e]: new for new, e in enumerate(by_slot)}
        self._ready = {e: new for new, e in enumerate(by_slot)}
        for expert in [e for e in self._recency if e not in self._ready]:
            del self._recency[expert]
        self.capacity = capacity
        self._free = list(range(len(keep), capacity))
        return moves

    def grow(self, capacity: int) -> list[int]:
        """Add free slots numbered after the existing ones; returns the new slot numbers."""
        new = list(range(self.capacity, capacity))
        self._free += new
        self.capacity = max(self.capacity, capacity)
        return new

    # --- on demand: least recently used ----------------------------------------------
    def touch(self, expert: int) -> bool:
        """A token needs ``expert`` now: count a hit (resident) or a miss, and mark it most
        recently used. Returns whether it was resident."""
        hit = expert in self._ready
        self.hits += hit
        self.misses += not hit
        if hit:
            self._recency.move_to_end(expert)
        return hit

    def begin_sync_load(self, expert: int, keep: Sequence[int]) -> int:
        """Reserve a slot for a synchronous load of ``expert``: a free one, else the slot of the
        least recently used ready expert outside ``keep`` (evicted now). Returns the slot;
        ``finish_sync_load`` or ``cancel_load`` follows."""
        if not self._free:
            self.evict(self.least_recent(keep))
        return self._reserve(expert)

    def least_recent(self, keep: Sequence[int]) -> int | None:
        """The least recently used ready expert outside ``keep`` (None: every ready one is kept)."""
        return next((e for e in self._recency if e not in keep), None)

    def finish_sync_load(self, expert: int) -> None:
        self._commit(expert)

    # --- on demand: guesses (speculative loads) ----------------------------------------
    def begin_guess(self, expert: int, keep: Sequence[int]) -> tuple[int, int | None] | None:
        """Reserve a slot for a speculative load of ``expert``: a free one, else the slot of the least
        recently used ready expert outside ``keep`` (evicted now). Returns (slot, the expert evicted
        or None), or None when every ready expert is kept and no slot is free. Once loaded, a guess
        is the least recently used expert (``touch`` promotes it when it is needed): an expert a pass
        used outranks a guess none did. ``finish_load``, ``cancel_load`` or ``cancel_guess`` follows."""
        victim = None
        if not self._free:
            victim = self.least_recent(keep)
            if victim is None:
                return None
            self.evict(victim)
        slot = self._reserve(expert)
        self._guesses[expert] = victim
        return slot, victim

    def cancel_guess(self, expert: int) -> int | None:
        """The guess's load was cancelled before it started, so its slot was never written: the
        expert evicted for it holds that slot again (least recently used), unless it is resident or
        loading elsewhere by now; else the slot is free. Returns the expert restored, or None."""
        victim = self._guesses.pop(expert)
        slot = self._loading.pop(expert)
        if victim is None or victim in self._ready or victim in self._loading:
            self._free.append(slot)
            return None
        self._ready[victim] = slot
        self._recency[victim] = None
        self._recency.move_to_end(victim, last=False)
        return victim

    def _reserve(self, expert: int) -> int:
        slot = self._free.pop(0)
        self._loading[expert] = slot
        return slot

    def _commit(self, expert: int) -> None:
        self._ready[expert] = self._loading.pop(expert)
        self._recency[expert] = None
        guess = expert in self._guesses  # not used yet: the least recently used (see ``begin_guess``)
        self._guesses.pop(expert, None)
        self._recency.move_to_end(expert, last=not guess)

    def _victims(self, scores: Sequence[float], wanted: Sequence[int]) -> list[int]:
        keep = set(wanted)
        return sorted((e for e in self._ready if e not in keep), key=lambda e: (scores[e], e))
