"""The on-demand strategy (exact: the LRU baseline), and its speculative prefetch.

On demand, every expert a pass routes to is made resident before it computes: a miss is read
synchronously on the forward thread into a free slot, else into the slot of the least recently
used expert the pass does not need.

With ``prefetch`` (as mixtral-offloading does), when layer l routes a pass's hidden state, layer
l+1's unmodified router is asked what it would pick for that same state (a guess: layer l+1 will
see a later one). Once layer l's own experts are resident (so a guess never delays the loads its
own layer needs), the guessed experts that are absent are queued on the background loader, each
into a free slot or the slot of a least recently used expert that is not guessed. Layer l+1 stays
exact: a guessed expert that has loaded is a hit, one being copied is waited for (never read
twice). What prefetch may cost the forward pass is bounded by a wrong guess's copy already under
way:

- when layer l+1 runs, its guesses still queued are cancelled (never read; one it needs is read at
  once instead, not behind others), and the expert each had evicted takes its slot back (the slot
  was never written); so are the queued guesses of a layer guessed again (stale) and leftovers of
  layers that already ran;
- a wrong guess being copied is not waited for, unless its slot is the only one left
  (``_make_room``: resident experts the pass does not need go first);
- a loaded guess no pass has used is the least recently used expert (the first to go), so wrong
  guesses never outlive experts that were used.

A prefetched slot is reserved in the slot pool (``loading``), so it is in no routing table until
its load is collected, and the tables leave an evicted slot before its load may write it. The
bookkeeping runs under the runtime's state lock; the copies run on the loader's thread.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Sequence

import torch

from swapmoe.core.errors import Corrupted
from swapmoe.executor.loader import Load


class OnDemand:
    """On-demand loading for a ``VirtualExperts`` runtime (its pools, tables, copier and loader)."""

    def __init__(self, runtime, prefetch: bool = False):
        self.runtime = runtime
        self.prefetch = prefetch
        self._in_flight: defaultdict[int, dict[int, Load]] = defaultdict(dict)  # layer -> expert -> its prefetch
        self._prefetched: defaultdict[int, set[int]] = defaultdict(set)  # brought by a prefetch, not needed yet
        self._guessed: dict[int, list[int]] = {}  # layer -> its guess, not queued yet (the layer before loads first)

    def attach(self, on: bool) -> None:
        """Serve on demand (``on``) or not: each layer's experts load their misses and, with
        prefetch, each layer's router passes its hidden state on to guess the next layer's experts."""
        layers = self.runtime.layers
        for index, layer in enumerate(layers):
            layer.experts.load_now = (lambda experts, i=index: self.load_now(i, experts)) if on else None
            guessing = on and self.prefetch and index + 1 < len(layers)
            layer.router.after_route = (lambda hidden, i=index + 1: self.guess(i, hidden)) if guessing else None

    def reset(self) -> None:
        """Forget the prefetches (the slots moved; none is in flight: the caller quiesced the loader)."""
        self._in_flight.clear()
        self._prefetched.clear()
        self._guessed.clear()

    # --- the pass needs these experts now ------------------------------------------------
    def load_now(self, index: int, experts: list[int]) -> None:
        """Synchronously make ``experts`` resident, evicting the least recently used others
        (inside a forward pass, on its thread: the tables change at once); then, with prefetch,
        queue the next layer's guess."""
        rt = self.runtime
        with rt._state:
            layer = rt.layers[index]
            pool = layer.pool
            changed = False
            if self.prefetch:
                self._guessed.pop(index, None)  # its layer runs: too late to load it
                changed = self._claim_guesses(index, experts)
            for expert in experts:
                if pool.touch(expert):
                    continue
                if self.prefetch:
                    changed |= self._make_room(index, experts)
                slot = pool.begin_sync_load(expert, keep=experts)
                changed = True
                try:
                    rt._sync.copy(index, expert, layer.experts.slot_tensors(slot), layer.experts.precision)
                except Exception as error:
                    pool.cancel_load(expert)  # the slot is free again, and the evicted expert unmapped
                    if isinstance(error, Corrupted):  # exact: each pass needing it fails; other strategies skip it
                        pool.set_aside(expert)
                    rt._publish_now(index)
                    raise
                pool.finish_sync_load(expert)
                rt.stats.on_demand_loads += 1
            if changed or (self.prefetch and rt._pending.waiting(index)):  # prefetches collected since the last install
                rt._publish_now(index)
            if self.prefetch and index + 1 in self._guessed:
                self._start_guess(index + 1, self._guessed.pop(index + 1))

    def _claim_guesses(self, index: int, experts: Sequence[int]) -> bool:
        """Before layer ``index`` loads ``experts``: finished prefetches become resident, queued ones
        are cancelled (never waited for: one it needs is read at once instead; so are leftovers of
        layers before it), needed ones being copied are waited for, and the needed experts a prefetch
        brought count as hits. Returns whether an expert a cancelled guess had evicted is resident
        again (the tables change)."""
        rt = self.runtime
        pool = rt.layers[index].pool
        rt._collect()
        for earlier in [i for i in self._in_flight if i < index]:  # ran already: what is still queued is stale
            if self._cancel_queued(earlier, lambda e: True):
                rt._publish_now(earlier)
        restored = self._cancel_queued(index, lambda e: True)
        for expert in experts:
            load = self._in_flight[index].get(expert)
            if load is not None and expert in pool.loading:
                self._wait(load, wasted=False)  # ready now, or failed (its slot free again: loaded below, or raised)
        self._forget_finished(index)
        prefetched = self._prefetched[index]
        prefetched &= set(pool.ready) | set(pool.loading)  # an evicted, failed or cancelled guess counts no more
        hits = prefetched.intersection(experts)
        rt.stats.prefetch_hits += len(hits)
        prefetched -= hits
        return restored

    def _make_room(self, index: int, keep: Sequence[int]) -> bool:
        """Before a synchronous load, when no slot is free and every ready expert is kept (resident
        experts the pass does not need go first, without waiting; its queued guesses were cancelled):
        as the last resort, wait for a guess being copied that the pass does not need (ready then,
        and the least recently used). Returns whether the tables changed."""
        pool = self.runtime.layers[index].pool
        changed = False
        while not pool.free and pool.least_recent(keep) is None:
            copying = [load for e, load in self._in_flight[index].items() if e in pool.loading and e not in keep]
            if not copying:
                return changed
            self._wait(copying[0], wasted=True)
            changed = True
        return changed

    # --- guessing the next layer -----------------------------------------------------------
    def guess(self, index: int, hidden: torch.Tensor) -> None:
        """The layer before ``index`` routed ``hidden``: note the experts layer ``index``'s router picks
        for it, most picked first; they are queued once that layer's own experts are resident."""
        guessed = self.runtime.layers[index].router.guess(hidden)  # a router's matmul and top-k, recording nothing
        with self.runtime._state:
            self._guessed[index] = guessed

    def _start_guess(self, index: int, guessed: list[int]) -> None:
        """Queue loads of the ``guessed`` experts of layer ``index`` that are absent, most picked first,
        while a slot can be had; its guesses of an earlier pass still queued and not guessed again
        are stale: cancelled."""
        rt = self.runtime
        layer = rt.layers[index]
        pool = layer.pool
        rt._collect()
        changed = self._cancel_queued(index, lambda e: e not in guessed)
        loads = []
        for expert in guessed:
            if expert in pool.ready or expert in pool.loading or expert in pool.damaged:
                continue
            reserved = pool.begin_guess(expert, keep=guessed)
            if reserved is None:
                break
            slot, evicted = reserved
            changed |= evicted is not None
            loads.append(Load(index, expert, slot, layer.experts.slot_tensors(slot), precision=layer.experts.precision))
        if changed:  # the evicted slots leave the tables before a load may write them (or a restored one is back)
            rt._publish_now(index)
        for load in loads:
            self._in_flight[index][load.expert] = load
            self._prefetched[index].add(load.expert)
            rt.loader.submit(load)
        rt.stats.prefetch_loads += len(loads)
        rt.stats.loads_started += len(loads)

    # --- prefetches in flight ----------------------------------------------------------------
    def _cancel_queued(self, index: int, drop) -> bool:
        """Cancel the prefetches of layer ``index`` not started yet whose expert ``drop`` names; each
        evicted expert whose slot is unwritten is ready in it again. Returns whether one was (the
        caller publishes the tables; the other slots are free, in no table)."""
        rt = self.runtime
        pool = rt.layers[index].pool
        restored = False
        for expert, load in list(self._in_flight[index].items()):
            if expert in pool.loading and drop(expert) and rt.loader.cancel(load):
                del self._in_flight[index][expert]
                self._prefetched[index].discard(expert)
                restored |= pool.cancel_guess(expert) is not None
                rt.stats.prefetch_cancelled += 1
        return restored

    def _wait(self, load: Load, wasted: bool) -> None:
        """The forward thread waits for a prefetch being copied (``wasted``: one the pass does not
        need, whose slot it must have), then collects it."""
        rt = self.runtime
        start = time.perf_counter()
        rt.loader.wait_for(load)
        rt.stats.prefetch_wait_s += time.perf_counter() - start
        if wasted:
            rt.stats.prefetch_wasted_waits += 1
        else:
            rt.stats.prefetch_waits += 1
        rt._collect()
        self._forget_finished(load.layer)

    def _forget_finished(self, index: int) -> None:
        pool = self.runtime.layers[index].pool
        self._in_flight[index] = {e: l for e, l in self._in_flight[index].items() if e in pool.loading}
