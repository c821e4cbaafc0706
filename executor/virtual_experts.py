"""Virtual experts: a model whose MoE layers keep a budgeted, changing set of experts in slots.

Per layer: a ``SlotPool`` (which expert is in which slot), the model's masked router
(which resident experts a token may use; importance, Eq. 1) and ``SlotExperts`` (slot
weights and the expert -> slot table). The resident set moves toward the most important
experts by amortized background loads. Deciding them runs on the updater thread
(``executor.updater``) while the next forward pass runs (on the CPU, where that thread
would contend with the forward pass for the interpreter, between passes instead); the
routing tables a decision builds are installed, and the loads they make safe started,
between passes (``between_passes``). The
public methods are called between forward passes (the engine's step lock is held), so the
tables never change inside one; pools and scores change under the state lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from swapmoe.core.errors import Corrupted
from swapmoe.core.plan import Strategy
from swapmoe.executor import lowered_dense, memory, quantization
from swapmoe.executor.adapters import adapter_for, describe, find_moe_blocks, install_masked_routers, with_precisions
from swapmoe.executor.loader import Copier, ExpertLoader, Load, LoadStats
from swapmoe.executor.gating import MaskedRouter
from swapmoe.executor.importance import Importance
from swapmoe.executor.on_demand import OnDemand
from swapmoe.executor.intra_op import single_threaded
from swapmoe.executor.skeleton import build_skeleton
from swapmoe.executor.slot_experts import SlotExperts, SlotTable
from swapmoe.executor.slots import SlotPool
from swapmoe.executor.store import ExpertStore
from swapmoe.executor.store_build import ensure_store
from swapmoe.executor.swap_stats import LayerActivity, SwapStats
from swapmoe.executor.updater import PendingTables, Worker

@dataclass(slots=True)
class Layer:
    router: MaskedRouter
    experts: SlotExperts
    pool: SlotPool
    scores: torch.Tensor  # decayed importance: what the resident set moves toward
    seen: torch.Tensor  # the router's cumulative importance at the last update

    def install(self, tables: Tables) -> None:
        """Route by ``tables`` from the next forward pass on."""
        self.experts.install(tables.slots)
        self.router.install(tables.resident)


@dataclass(frozen=True, slots=True)
class Tables:
    """What one layer's forward passes route by: where each expert is, and which are resident."""

    slots: SlotTable
    resident: torch.Tensor  # [E] bool


class VirtualExperts:
    """The model, its slots per layer, and the loads that move experts in and out.

    Construction builds the skeleton and reads the store's manifest; ``resize`` gives the
    layers their slots and fills them (the model cannot run before that). ``importance``: what
    updates rank experts by ("gate": Eq. 1, "count": tokens routed, "random": seeded noise; see
    ``executor.importance``). ``prefetch``: on demand only, also load the next layer's guessed
    experts in the background (see ``executor.on_demand``). ``dense_precision``: of the weights
    outside the routed experts (``executor.lowered_dense``)."""

    def __init__(self, checkpoint: Path, device: str = "cpu",
                 store_root: Path | None = None, max_loads_per_update: int = 1, decay: float = 0.5,
                 load_bandwidth: float | None = None, log=print, background_updates: bool | None = None,
                 importance: str = "gate", importance_seed: int = 0, prefetch: bool = False,
                 dense_precision: str = ""):
        self._importance = Importance(importance, importance_seed)  # checked before any work
        self.device = torch.device(device)
        memory.return_large_frees_to_the_os()  # else the allocator keeps passes' temporaries: RSS over budget
        lowered_dense.check_checkpoint(dense_precision, Path(checkpoint), self.device)  # before a store is built
        with single_threaded():  # the caller's thread is not the forward thread (see intra_op.single_threaded)
            store_dir = ensure_store(checkpoint, store_root, log=log)
            self.store = ExpertStore(store_dir, bandwidth=load_bandwidth)
            try:
                self.model = build_skeleton(Path(checkpoint), store_dir, self.store.manifest, self.device,
                                            dense_precision)
            except BaseException:
                self.store.close()
                raise
        manifest = self.store.manifest
        norms = [torch.tensor(l.norms) for l in manifest.layers]
        routers = install_masked_routers(self.model, norms)
        self.layout = with_precisions(describe(self.model), self.store, self.device)  # before slots replace the experts
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
        # Pools and scores change on the updater thread and, between passes, on callers' threads.
        self._state = threading.RLock()
        self._pending = PendingTables()
        # Decide updates on a thread of their own where the forward thread mostly waits for the
        # device with the interpreter free (CUDA). On the CPU the forward pass is itself Python-bound:
        # a second thread doing small tensor ops hands the interpreter lock back and forth with it
        # and costs more than it saves (measured: ITL mean +5% over deciding inline), so the
        # forward thread decides between passes.
        background = self.device.type == "cuda" if background_updates is None else background_updates
        self.updater = Worker(self._work, "expert-updater") if background else None
        self.loader = ExpertLoader(self.store, self.device, self.io,
                                   on_finished=self.updater.kick if self.updater else lambda: None)
        self.on_demand = OnDemand(self, prefetch)
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

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precision each layer's slots hold ("": the checkpoint's)."""
        return tuple(l.experts.precision for l in self.layers)

    def resident(self) -> list[list[int]]:
        with self._state:
            return [l.pool.resident for l in self.layers]

    def activity(self) -> list[LayerActivity]:
        with self._state:
            return [LayerActivity(*l.router.stats(), l.pool.resident) for l in self.layers]

    @property
    def staging_bytes(self) -> int:
        return self.loader.staging_bytes + self._sync.staging_bytes

    def slot_bytes(self) -> int:
        return self.layout.expert_bytes(self.capacities, self.precisions) if self._filled else 0

    # --- routing tables: built with the pools' state, installed between passes -----------
    def _tables(self, layer: Layer) -> Tables:
        ready = layer.pool.ready
        return Tables(layer.experts.table(ready), layer.router.mask(ready))

    def _post(self, index: int, loads: Sequence[Load] = ()) -> None:
        """Tables for the pool's ready experts now, and the loads that may start once they are
        installed (caller holds the state lock)."""
        self._pending.post(index, self._tables(self.layers[index]), loads)

    def _install(self) -> None:
        """Between passes: the newest tables become what routing uses, then their loads start."""
        tables, loads = self._pending.take()
        for index, t in tables.items():
            self.layers[index].install(t)
        for load in loads:
            self.loader.submit(load)

    # --- plans: capacities and strategy ------------------------------------------------
    def resize(self, capacities: Sequence[int], precisions: Sequence[str] = ()) -> None:
        """Give each layer its number of slots and their precision (empty: as they are; "": the
        checkpoint's): shrinking keeps the most important experts, growing adds empty slots
        (filled at once when nothing is resident yet, else by updates), and a layer changing
        precision refills its slots at once with its most important experts, at the new one."""
        precisions = tuple(precisions) or self.precisions
        with self._state:
            self._settle()
            first, self._filled = not self._filled, True
            # The first fill reads the whole resident set (gigabytes at paper scale): show it on a terminal.
            filling = tqdm(total=sum(capacities), desc="filling expert slots", unit="expert",
                           disable=None if first else True, leave=False)
            layers = list(enumerate(zip(self.layers, capacities, precisions, strict=True)))
            refill = {i for i, (layer, _, precision) in layers if first or precision != layer.experts.precision}
            for index, (layer, capacity, precision) in layers:  # what frees memory first: the budget holds
                if precision != layer.experts.precision:
                    layer.experts.set_precision(precision, self._parts(index, precision), self.device)
                elif index not in refill and capacity < layer.pool.capacity:
                    layer.experts.resize(capacity, layer.pool.shrink(capacity, layer.scores.tolist()), self.device)
            for index, (layer, capacity, precision) in layers:  # then what takes it
                if index in refill:
                    self._fill(index, capacity, filling, serving=not first)
                elif capacity > layer.pool.capacity:
                    keep = {slot: slot for slot in layer.pool.ready.values()}
                    layer.pool.grow(capacity)
                    layer.experts.resize(capacity, keep, self.device)
                self._post(index)
            filling.close()
            self._install()
            if not first:
                self.update(max_loads=max(capacities))

    def _fill(self, index: int, capacity: int, progress, serving: bool) -> None:
        """Layer ``index``'s slots, empty, filled at once with its most important experts. While
        ``serving``, one that fails to load (a damaged one is set aside) leaves its slot free for
        a later update; at start-up the error is raised (the store is marked for a rebuild)."""
        layer = self.layers[index]
        layer.pool = pool = SlotPool(layer.pool.num_experts, capacity)
        layer.experts.resize(capacity, {}, self.device)
        for expert, slot in pool.fill(sorted(pool.wanted(layer.scores.tolist(), capacity))):  # slot i = expert i if all fit
            try:
                self._sync.copy(index, expert, layer.experts.slot_tensors(slot), layer.experts.precision)
            except Exception as error:  # noqa: BLE001 - served without it, as a failed background load is
                if not serving:
                    raise
                pool.cancel_load(expert)
                self.stats.failed_loads += 1
                if isinstance(error, Corrupted):
                    pool.set_aside(expert)
                continue
            pool.finish_load(expert, layer.scores.tolist(), capacity)
            progress.update()

    def _parts(self, index: int, precision: str) -> list[quantization.PartShape]:  # one expert, as stored
        return [quantization.PartShape(p.name, p.shape, p.torch_dtype(self.store.manifest.dtype))
                for p in self.store.spec(index, precision).parts]

    def restart(self, capacities: Sequence[int]) -> None:
        """Start over as a freshly built runtime would (no traffic seen, slots filled by expert norms):
        profiling scores many configurations on one runtime, each from the same state."""
        with self._state:
            self._settle()
            self._importance.reset()
            self.forget_traffic()
            self._filled = False
            self._since_update = 0
            self.resize(capacities)

    def forget_traffic(self) -> None:
        """What the routers saw so far no longer moves the resident sets (passes that measured, not served)."""
        with self._state:
            for index, layer in enumerate(self.layers):
                layer.scores = layer.router.expert_norms.double().cpu() * 1e-9
                layer.seen = self._importance.cumulative(index, layer.router, draw=False)

    def wait_for_loads(self) -> None:
        """Block until the updates decided and the loads started so far are done (their tables
        are installed by the next ``between_passes``): a deterministic stand-in for updates and
        loads that land within one pass."""
        if self.updater:
            self.updater.wait_idle()
            self._install()  # the loads those decisions started
        self.loader.wait_idle()
        if self.updater:
            self.updater.wait_idle()  # their tables are built

    def set_strategy(self, strategy: Strategy) -> None:
        with self._state:
            self._settle()
            self.strategy = strategy
            for layer in self.layers:
                layer.router.strategy = strategy
            self.on_demand.attach(strategy is Strategy.ON_DEMAND)

    # --- seamless updates (paper section 3.2) ------------------------------------------
    def begin_input(self) -> None:
        """A new input starts: its prefill's routing is the freshest sign of what it needs, so
        the layers' turns start over right after it (every layer within ``update_frequency``
        passes, not all of them on the first token: that one token would pay for them all)."""
        self._since_update = -1

    def between_passes(self, update_frequency: int) -> None:
        """After each forward pass: the tables built since the last one become what routing uses
        and their loads start, and the layers whose turn it is move their resident sets toward
        importance: handed to the updater, which decides while the next pass runs, or decided
        here (see ``__init__``). Each layer has a turn every ``update_frequency`` passes (0:
        never, a static resident set); a share of the layers after each pass, so the work is
        spread over the passes."""
        if self.updater:
            self._install()
        else:  # deciding on this thread (see __init__): finished loads are collected here too
            self.poll()
        if not update_frequency:
            return
        self._since_update += 1
        turn = self._since_update % update_frequency
        due = [i for i, layer in enumerate(self.layers)  # a layer holding every expert has nothing to move
               if i % update_frequency == turn and len(layer.pool.ready) < layer.pool.num_experts]
        if due and self.updater:
            self.updater.kick(due)
        elif due:
            self.update(layers=due)

    def update(self, max_loads: int | None = None, layers: Sequence[int] | None = None) -> int:
        """Now, on the calling thread (between passes): move each layer's (or the given layers')
        resident set toward its most important experts, starting up to ``max_loads`` background
        loads per layer. Returns the loads started."""
        with self._state:
            started = self._decide(range(len(self.layers)) if layers is None else layers, max_loads)
        self._install()
        return started

    def poll(self) -> int:
        """Make finished loads visible to routing now (between passes); returns how many were."""
        with self._state:
            done = self._collect()
        self._install()
        return done

    def _work(self, due: set[int]) -> None:
        """The updater thread: finished loads, then the decisions of the layers handed over."""
        with self._state:
            self._decide(sorted(due), None)

    def _decide(self, layers: Sequence[int], max_loads: int | None) -> int:
        """Collect finished loads, then reserve slots for up to ``max_loads`` loads per layer in
        ``layers``; their tables and loads wait in the pending tables. Caller holds the state lock."""
        self._collect()
        if self.strategy is Strategy.ON_DEMAND or not layers:
            return 0
        self.stats.updates += 1
        started = 0
        for index in layers:
            layer = self.layers[index]
            if len(layer.pool.ready) == layer.pool.num_experts:
                continue  # every expert resident: nothing can move
            importance = self._importance.cumulative(index, layer.router)
            layer.scores = layer.scores * self.decay + (importance - layer.seen)
            layer.seen = importance
            scores = layer.scores.tolist()
            before = len(layer.pool.ready)
            loads = [Load(index, expert, slot, layer.experts.slot_tensors(slot), precision=layer.experts.precision)
                     for expert, slot in layer.pool.begin_loads(scores, layer.pool.capacity,
                                                                max_loads or self.max_loads_per_update)]
            if loads:  # a slot freed for a load is out of the tables before the load may write it
                self.stats.evictions += before - len(layer.pool.ready)
                self._post(index, loads)
                started += len(loads)
        self.stats.loads_started += started
        return started

    def _collect(self) -> int:
        """Finished loads into the pools, their tables to the pending tables; returns how many were
        usable. Caller holds the state lock."""
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
            self._post(load.layer)
            done += 1
        self.stats.loads_finished += done
        return done

    def _settle(self) -> None:
        """Stop background work (before slots move): loads not started or queued are dropped,
        the one in flight finishes and is published, so no slot is left loading. Caller holds
        the state lock, so the updater waits meanwhile."""
        _, waiting = self._pending.take()
        for load in waiting + self.loader.quiesce():
            self.layers[load.layer].pool.cancel_load(load.expert)
        self._collect()
        self.on_demand.reset()
        for index in range(len(self.layers)):  # tables for the pools as they are now
            self._post(index)
        self._install()

    # --- on-demand strategy (exact; the LRU baseline): executor.on_demand ----------------
    def _publish_now(self, index: int) -> None:
        """Install the layer's tables at once (inside a pass: on-demand loads), superseding any waiting."""
        self._pending.drop(index)
        self.layers[index].install(self._tables(self.layers[index]))

    def close(self) -> None:
        if self.updater:
            self.updater.close()
        self.loader.close()
        self.store.close()
