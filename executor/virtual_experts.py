"""Virtual experts: a model whose MoE layers keep a budgeted, changing set of experts in slots.

Per layer: a ``SlotPool`` (which expert is in which slot), the model's masked router
(which resident experts a token may use; importance, Eq. 1) and ``SlotExperts`` (slot
weights and the expert -> slot table). The resident set moves toward the most important
experts by amortized background loads (``update``), made visible between forward passes
(``poll``). Every method here is called between forward passes: the engine's step lock
is held, so a mapping never changes inside one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from swapmoe.core.errors import Corrupted
from swapmoe.core.plan import Strategy
from swapmoe.executor.adapters import adapter_for, describe, find_moe_blocks, install_masked_routers
from swapmoe.executor.loader import Copier, ExpertLoader, Load, LoadStats
from swapmoe.executor.routing import MaskedRouter
from swapmoe.executor.skeleton import build_skeleton
from swapmoe.executor.slot_experts import SlotExperts
from swapmoe.executor.slots import SlotPool
from swapmoe.executor.store import ExpertStore, ensure_store

@dataclass(slots=True)
class Layer:
    router: MaskedRouter
    experts: SlotExperts
    pool: SlotPool
    scores: torch.Tensor  # decayed importance: what the resident set moves toward
    seen: torch.Tensor  # the router's cumulative importance at the last update


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


class VirtualExperts:
    """The model, its slots per layer, and the loads that move experts in and out.

    Construction builds the skeleton and reads the store's manifest; ``resize`` gives the
    layers their slots and fills them (the model cannot run before that)."""

    def __init__(self, checkpoint: Path, device: str = "cpu",
                 store_root: Path | None = None, max_loads_per_update: int = 1, decay: float = 0.5,
                 load_bandwidth: float | None = None, log=print):
        self.device = torch.device(device)
        store_dir = ensure_store(checkpoint, store_root, log=log)
        self.store = ExpertStore(store_dir, bandwidth=load_bandwidth)
        manifest = self.store.manifest
        self.model = build_skeleton(Path(checkpoint), store_dir, manifest, self.device)
        norms = [torch.tensor(l.norms) for l in manifest.layers]
        routers = install_masked_routers(self.model, norms)
        self.layout = describe(self.model)  # before slots replace the experts: all E per layer
        kind = adapter_for(self.model).slots
        self.layers: list[Layer] = []
        for block, router, norm in zip(find_moe_blocks(self.model), routers, norms):
            experts = SlotExperts(block.experts, kind, block.num_experts)
            block.module.experts = experts
            scores = norm.double() * 1e-9  # no traffic yet: prefer the largest experts
            self.layers.append(Layer(router.to(self.device), experts, SlotPool(block.num_experts, 1), scores,
                                     torch.zeros(block.num_experts, dtype=torch.double)))
        self.max_loads_per_update = max_loads_per_update
        self.decay = decay
        self.strategy = Strategy.MASKED_GATING
        self.stats = SwapStats()
        self.io = LoadStats()
        self._sync = Copier(self.store, self.device, self.io)  # on-demand and start-up loads
        self.loader = ExpertLoader(self.store, self.device, self.io)
        self._filled = False
        self._since_update = 0

    @property
    def tier(self) -> str:
        return "pinned host memory <- " + self.store.tier if self.device.type == "cuda" else self.store.tier

    # --- what is where --------------------------------------------------------------
    @property
    def capacities(self) -> tuple[int, ...]:
        """Slots per layer; empty before the first ``resize``."""
        return tuple(l.pool.capacity for l in self.layers) if self._filled else ()

    def resident(self) -> list[list[int]]:
        return [l.pool.resident for l in self.layers]

    def activity(self) -> list[LayerActivity]:
        return [LayerActivity(*l.router.stats(), l.pool.resident) for l in self.layers]

    @property
    def staging_bytes(self) -> int:
        return self.loader.staging_bytes + self._sync.staging_bytes

    def slot_bytes(self) -> int:
        return self.layout.expert_bytes(self.capacities) if self._filled else 0

    def _publish(self, layer: Layer) -> None:
        """Make the pool's ready experts the ones routing may use (between forward passes)."""
        layer.experts.map(layer.pool.ready)
        layer.router.set_resident(sorted(layer.pool.ready))

    # --- plans: capacities and strategy ------------------------------------------------
    def resize(self, capacities: Sequence[int]) -> None:
        """Give each layer its number of slots: shrinking keeps the most important experts,
        growing adds empty slots (filled at once when nothing is resident yet, else by updates)."""
        self._settle()
        first, self._filled = not self._filled, True
        for index, (layer, capacity) in enumerate(zip(self.layers, capacities)):
            pool = layer.pool
            if first:
                layer.pool = pool = SlotPool(pool.num_experts, capacity)
                layer.experts.resize(capacity, {}, self.device)
                wanted = sorted(pool.wanted(layer.scores.tolist(), capacity))  # index order: slot i = expert i when all fit
                for expert, slot in pool.fill(wanted):
                    self._sync.copy(index, expert, layer.experts.slot_tensors(slot))
                    pool.finish_load(expert, layer.scores.tolist(), capacity)
            elif capacity < pool.capacity:
                moves = pool.shrink(capacity, layer.scores.tolist())
                layer.experts.resize(capacity, moves, self.device)
            elif capacity > pool.capacity:
                keep = {slot: slot for slot in pool.ready.values()}
                pool.grow(capacity)
                layer.experts.resize(capacity, keep, self.device)
            self._publish(layer)
        if not first:
            self.update(max_loads=max(capacities))

    def restart(self, capacities: Sequence[int]) -> None:
        """Start over as a freshly built runtime would (no traffic seen, slots filled by expert
        norms), without rebuilding the model: accuracy profiling scores many configurations on
        one runtime, each from the same state, so a score does not depend on what ran before."""
        self._settle()
        for layer in self.layers:
            layer.scores = layer.router.expert_norms.double().cpu() * 1e-9
            layer.seen = layer.router.importance.detach().to("cpu", torch.double, copy=True)
        self._filled = False
        self._since_update = 0
        self.resize(capacities)

    def wait_for_loads(self) -> None:
        """Block until the background loads started so far have finished (they are published by
        the next ``poll``): a deterministic stand-in for loads that land within one pass."""
        self.loader.wait_idle()

    def set_strategy(self, strategy: Strategy) -> None:
        self._settle()
        self.strategy = strategy
        for index, layer in enumerate(self.layers):
            layer.router.strategy = strategy
            layer.experts.load_now = (lambda experts, i=index: self._load_now(i, experts)) \
                if strategy is Strategy.ON_DEMAND else None

    # --- seamless updates (paper section 3.2) ------------------------------------------
    def begin_input(self) -> None:
        """A new input starts: update right after its prefill, when its routing is known."""
        self._since_update = None

    def between_passes(self, update_frequency: int) -> None:
        """After each forward pass: finished loads become usable, and each layer's resident set
        moves toward importance once every ``update_frequency`` passes (0: never, a static
        resident set). Layers take turns, a share of them after each pass, so the work of an
        update is spread over the passes instead of landing on one token."""
        self.poll()
        if not update_frequency:
            return
        if self._since_update is None:  # right after a prefill: every layer
            self._since_update = 0
            self.update()
            return
        self._since_update += 1
        turn = self._since_update % update_frequency
        self.update(layers=[i for i in range(len(self.layers)) if i % update_frequency == turn])

    def update(self, max_loads: int | None = None, layers: Sequence[int] | None = None) -> int:
        """Move each layer's (or the given layers') resident set toward its most important
        experts: start up to ``max_loads`` background loads per layer. Returns the loads started."""
        self.poll()
        if self.strategy is Strategy.ON_DEMAND:
            return 0
        self.stats.updates += 1
        started = 0
        for index in range(len(self.layers)) if layers is None else layers:
            layer = self.layers[index]
            if len(layer.pool.ready) == layer.pool.num_experts:
                continue  # every expert resident: nothing can move
            importance = layer.router.importance.detach().to("cpu", torch.double, copy=True)
            layer.scores = layer.scores * self.decay + (importance - layer.seen)
            layer.seen = importance
            before = set(layer.pool.ready)
            for expert, slot in layer.pool.begin_loads(layer.scores.tolist(), layer.pool.capacity,
                                                       max_loads or self.max_loads_per_update):
                self.loader.submit(Load(index, expert, slot, layer.experts.slot_tensors(slot)))
                started += 1
            if set(layer.pool.ready) != before:  # a slot was freed for a load: stop routing to it now
                self.stats.evictions += len(before - set(layer.pool.ready))
                self._publish(layer)
        self.stats.loads_started += started
        return started

    def poll(self) -> int:
        """Make finished loads visible to routing; returns how many were."""
        done = 0
        for load in self.loader.finished():
            layer = self.layers[load.layer]
            if load.expert not in layer.pool.loading:
                continue  # not a load this pool is waiting for
            if load.error is not None:  # the slot holds no expert: free it for a later update
                layer.pool.cancel_load(load.expert)
                self.stats.failed_loads += 1
                if isinstance(load.error, Corrupted):  # a retry would read the same bytes: load others instead
                    layer.pool.set_aside(load.expert)
                continue
            evicted = layer.pool.finish_load(load.expert, layer.scores.tolist(), layer.pool.capacity)
            self.stats.evictions += len(evicted)
            self._publish(layer)
            done += 1
        self.stats.loads_finished += done
        return done

    def _settle(self) -> None:
        """Stop background loads (before slots move): queued ones are dropped, the one in
        flight finishes and is published, so no slot is left loading."""
        for load in self.loader.quiesce():
            self.layers[load.layer].pool.cancel_load(load.expert)
        self.poll()

    # --- on-demand strategy (exact; the LRU baseline) -------------------------------------
    def _load_now(self, index: int, experts: list[int]) -> None:
        """Synchronously make ``experts`` resident, evicting the least recently used others."""
        layer = self.layers[index]
        pool = layer.pool
        changed = False
        for expert in experts:
            if pool.touch(expert):
                continue
            slot = pool.begin_sync_load(expert, keep=experts)
            changed = True
            try:
                self._sync.copy(index, expert, layer.experts.slot_tensors(slot))
            except Exception as error:
                pool.cancel_load(expert)  # the slot is free again, and the evicted expert unmapped
                if isinstance(error, Corrupted):  # exact: each pass needing it fails; other strategies skip it
                    pool.set_aside(expert)
                self._publish(layer)
                raise
            pool.finish_sync_load(expert)
            self.stats.on_demand_loads += 1
        if changed:
            self._publish(layer)

    def close(self) -> None:
        self.loader.close()
        self.store.close()
