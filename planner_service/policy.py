"""The planner's policy: which plan each executor should run, and why.

For an executor whose model has an accuracy profile and whose device has a device profile,
the plan comes from that executor's frontier for the workload it serves (searched in the
background once the profiles are known; a budget is answered from the frontier at once and a
search at the exact budget follows). Otherwise the even split is the fallback, and says why
in its origin; a device without a profile is profiled through its Connect stream first.

``choose`` runs under the registry's lock and never searches; searches and profiles run on
the policy's own threads, which hand a better plan's node id to ``on_plan_ready`` (the
registry then calls ``choose`` again). The policy knows the fleet only through the plain
callables it is built with; the registry builds it and calls it, never the other way round.
(``record`` arguments are ``records.ExecutorRecord``s.)
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from swapmoe.core.budget import MemoryModel
from swapmoe.core.plan import Plan
from swapmoe.core.sizes import format_size
from swapmoe.planner_service import frontier as frontiers
from swapmoe.planner_service import profiles
from swapmoe.planner_service.policy_files import PolicyFiles
from swapmoe.planner_service.objectives import Objectives, Service, inflection_latency_ns
from swapmoe.planner_service.search import Found, SearchSettings, candidates, search
from swapmoe.planner_service.verification import Verifier, configuration, verifier_for, verify
from swapmoe.planner_service.workload import Hysteresis, LoadTracker, WorkloadTracker, streams
from swapmoe.rpc import convert
from swapmoe.v1 import executor_pb2 as epb


log = logging.getLogger(__name__)
# How often the accuracy profiles on disk are looked for again when an unprofiled model registers
# (10,000 executors of one unprofiled model would otherwise scan the disk 10,000 times).
RESCAN_S = 10.0
# Searches (frontiers, refinements) waiting for the search thread: each takes seconds, so a burst of
# registrations (or of fake nodes) queues hours of work past this; the rest wait for a re-registration.
MAX_QUEUED_SEARCHES = 64


@dataclass(frozen=True)
class PlannerSettings:
    accuracy_roots: tuple[Path, ...] = ()  # where accuracy profiles are found
    shipped_profiles: bool = True  # and the bundled models' own (models/profiles), for a model the roots lack
    state_dir: Path | None = None  # device profiles and frontiers are kept here
    search: SearchSettings = SearchSettings()
    frontier_points: int = frontiers.MAX_POINTS
    latency_target_ns: float | None = None  # per stream; None: the device's inflection point (section 3.4.1)
    throughput_target: float = 0.0  # tokens/s over all streams at the offered load; 0: none
    verify: int = 0  # candidates scored before a plan is settled where they are near ties (< 2: none)
    profile_request: epb.ProfileRequest = field(default_factory=epb.ProfileRequest)
    profile_devices: bool = True  # profile a new device through its Connect stream
    profile_timeout_s: float = 600.0
    hysteresis: Hysteresis = Hysteresis()


@dataclass(frozen=True, slots=True)
class Choice:
    """A plan to send (version assigned by the registry), why, and what the models predict."""

    plan: Plan
    reason: str
    found: Found | None = None


@dataclass
class _Node:
    """What the planner knows of one executor's model and device."""

    fingerprint: str
    memory: MemoryModel
    profile_state: str = "none"
    objectives: dict[str, Objectives] = field(default_factory=dict)
    inflection_ns: float = 0.0  # one stream's latency at the device's inflection point
    frontiers: dict[str, frontiers.Frontier] = field(default_factory=dict)  # by frontiers.key
    tracker: WorkloadTracker | None = None
    load: LoadTracker = field(default_factory=lambda: LoadTracker(1))  # its offered load, in streams
    key: str = ""
    budget: int = 0  # the budget its plan was last chosen for


class PlanPolicy:
    """Which plan each executor should run (this planner process's policy, not the process)."""

    def __init__(self, settings: PlannerSettings, *, on_plan_ready: Callable[[str, str], None],
                 connected: Callable[[str], bool], profile: Callable[[str, epb.ProfileRequest, float], epb.ProfileResult]):
        """``on_plan_ready(node_id, why)``: a better plan for ``node_id`` is ready (a frontier, a refined
        search, a profile); ``connected(node_id)``: whether it is there to plan for; ``profile(node_id,
        request, timeout_s)``: measure its device through its stream (raises when no profile comes)."""
        self.settings = settings
        self._on_plan_ready, self._connected, self._profile = on_plan_ready, connected, profile
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self.files = PolicyFiles(settings.state_dir, settings.accuracy_roots, settings.shipped_profiles)
        self._accuracy = self.files.find_accuracy()
        self._scanned = time.monotonic()
        self._work = ThreadPoolExecutor(1, thread_name_prefix="planner-search")  # searches, one at a time
        self._queued: set[tuple] = set()  # (node id, what) of the searches waiting, each once
        self._profiling = ThreadPoolExecutor(4, thread_name_prefix="planner-profile")  # waits on devices
        self._verifiers: dict[str, Verifier | None] = {}  # by model fingerprint

    # --- called by the registry, under its lock: fast, never searches ----------------
    def choose(self, record, why: str) -> Choice:
        budget = record.budget_bytes
        node = self._node(record.node_id, record.registration.model_fingerprint, record.memory_model)
        workload, frontier = self._lookup(node, record)
        found = frontier.at(budget) if frontier else None
        node.budget = budget
        if frontier is not None and frontier.key != frontiers.key(workload, node.load.current):
            self._build_missing(record.node_id)  # the load (or workload) seen now has no frontier yet
        if found is None:
            reason = self._fallback_reason(node, workload)
            plan = record.memory_model.default_plan(budget, 0, f"planner:even-split budget={format_size(budget)} "
                                                               f"({reason})")
            return Choice(plan, f"{why}; {reason}: even split")
        if found.budget_bytes != budget or self._unverified(found):
            self._search_later(self._refine, record.node_id, frontier.key, budget, found)
        return Choice(found.plan(0, found.origin(budget)), f"{why}; searched plan for workload {frontier.workload!r}"
                                             f"{f' at {streams(found.offered_load)}' if found.rows else ''}"
                                             f"{f'; verified: {found.verified}' if found.verified else ''}", found)

    def prepare(self, node_id: str, fingerprint: str, memory: MemoryModel) -> bool:
        """An executor registers: load what its plans need (stored device profile and frontiers)
        so ``choose`` can answer at once. Returns True when its device must be measured
        (``measure``, once it is registered)."""
        node = self._node(node_id, fingerprint, memory)
        if node.fingerprint and node.fingerprint not in self._accuracy and time.monotonic() - self._scanned > RESCAN_S:
            self._scanned = time.monotonic()  # a profile copied in since: looked for at most every RESCAN_S
            self._accuracy.update(self.files.find_accuracy())
        if node.fingerprint not in self._accuracy or node.profile_state in ("profiling", "ready"):
            return False
        device = self.files.load_device(node.fingerprint, node_id)
        if device is not None:
            self._ready(node_id, device, replan=False)
            return False
        if not self.settings.profile_devices:
            node.profile_state = "none (device profiling is off)"
            return False
        node.profile_state = "profiling"
        return True

    def revisit(self) -> list[str]:
        """Connected executors whose model had no accuracy profile are prepared again, as at
        registration: a profile written after they connected (profiling runs for minutes at
        paper scale) is used without their reconnecting. Returns the node ids now profiled."""
        waiting = [(node_id, node) for node_id, node in list(self._nodes.items())
                   if node.fingerprint and node.fingerprint not in self._accuracy
                   and self._connected(node_id)]
        picked = []
        for node_id, node in waiting:
            if self._nodes.get(node_id) is not node:
                continue  # re-registered (another model or memory) or forgotten meanwhile: its own path prepares it
            if self.prepare(node_id, node.fingerprint, node.memory):
                self.measure(node_id)  # then its frontiers, then a replan
            if node.fingerprint in self._accuracy:
                picked.append(node_id)
                self.registered(node_id)
                if node.profile_state == "ready":  # a stored device profile: frontiers at hand, plan now
                    self._replan(node_id, "an accuracy profile of its model appeared")
        return picked

    def registered(self, node_id: str) -> None:
        """``node_id`` is registered and connected: search the frontiers it still lacks (ones skipped
        while it was away, or never queued)."""
        node = self._nodes.get(node_id)
        if node is not None and node.profile_state == "ready":
            self._build_missing(node_id)

    def measure(self, node_id: str) -> None:
        """Profile a registered executor's device through its Connect stream, in the background."""
        self._profiling.submit(self._measure, node_id)

    def observe(self, record, activations) -> str | None:
        """An expert report; returns why the plan should change when the recognised workload did."""
        node = self._nodes.get(record.node_id)
        accuracy = self._accuracy.get(node.fingerprint) if node else None
        if accuracy is None:
            return None
        if node.tracker is None:
            node.tracker = WorkloadTracker(accuracy.histograms, self.settings.hysteresis, current=record.workload)
        if not node.tracker.observe(activations):
            return None
        return f"workload shift to {node.tracker.current!r}: {node.tracker.why}"

    def observe_load(self, record, running: int, waiting: int) -> str | None:
        """A throughput report; returns why the plan should change when the offered load did."""
        node = self._nodes.get(record.node_id)
        if node is None or node.profile_state != "ready":
            return None
        return node.load.why if node.load.observe(running, waiting) else None

    def recognises_workloads(self, node_id: str) -> bool:
        """Whether expert telemetry from ``node_id`` is of use: its model has an accuracy profile,
        whose per-workload histograms the reports are matched against."""
        node = self._nodes.get(node_id)
        return node is not None and node.fingerprint in self._accuracy

    def searched(self, record) -> bool:
        """Whether ``choose`` would answer ``record`` from a frontier."""
        node = self._nodes.get(record.node_id)
        frontier = self._lookup(node, record)[1] if node is not None else None
        return frontier is not None and frontier.at(record.budget_bytes) is not None

    def status(self, node_id: str) -> str:
        node = self._nodes.get(node_id)
        return node.profile_state if node else "none"

    def model_of(self, node_id: str) -> str:
        """The fingerprint of the model the planner plans ``node_id`` for ("" when unknown)."""
        node = self._nodes.get(node_id)
        return node.fingerprint if node else ""

    def recognised(self, node_id: str) -> str:
        node = self._nodes.get(node_id)
        return node.tracker.current if node and node.tracker else ""

    def forget(self, node_id: str) -> None:
        """The registry forgot ``node_id``: its profile state, frontiers and workload go too."""
        self._nodes.pop(node_id, None)

    def close(self) -> None:
        self._work.shutdown(wait=False, cancel_futures=True)
        self._profiling.shutdown(wait=False, cancel_futures=True)
        for verifier in filter(None, self._verifiers.values()):
            verifier.close()

    # --- own threads ------------------------------------------------------------------
    def _measure(self, node_id: str) -> None:
        """Profile the device through its Connect stream, then build its frontiers."""
        try:
            measured = self._profile(node_id, self.settings.profile_request, self.settings.profile_timeout_s)
            device = convert.device_profile_from_pb(measured)
            node = self._nodes.get(node_id)
            if node is None:
                return  # forgotten meanwhile
            if (device.model_fingerprint, device.node_id) != (node.fingerprint, node_id):
                raise ValueError(f"the executor answered with a profile of model {device.model_fingerprint[:64]!r} "
                                 f"on node {device.node_id[:128]!r}, not of the model it registered "
                                 f"({node.fingerprint}) on {node_id!r}")
            self.files.save_device(device)
        except Exception as error:  # noqa: BLE001 - the fallback stays; the status says why
            log.warning("device profile of %s failed: %s", node_id, error)
            if node_id in self._nodes:
                self._nodes[node_id].profile_state = f"failed: {error}"[:200]
            return
        self._ready(node_id, device)

    def _ready(self, node_id: str, device, replan: bool = True) -> None:
        node = self._nodes[node_id]
        accuracy = self._accuracy[node.fingerprint]
        node.objectives = profiles.objectives(accuracy, device, node.memory)
        node.inflection_ns = inflection_latency_ns(next(iter(node.objectives.values())).latency,
                                                   device.inflection_update_frequency)
        node.key = frontiers.node_key(node.fingerprint, accuracy.digest, device, node.memory)
        node.profile_state = "ready"
        loaded = self._load_frontiers(node)
        if replan:  # else (at registration) ``registered`` queues them once the record is in
            self._build_missing(node_id)
        if loaded and replan:
            self._replan(node_id, "frontiers loaded from the planner's state")

    def _build_missing(self, node_id: str) -> None:
        """Queue the searches of the frontiers a ready node lacks (``_build_next``, one at a time)."""
        self._search_later(self._build_next, node_id)

    def _build_next(self, node_id: str) -> None:
        """Search one missing frontier, then queue the rest. Which one is chosen at its turn: the
        workload recognised now (a shift seen while others were searched is answered next), else the
        default, else by name."""
        node = self._nodes[node_id]
        wanted, default, load = node.tracker.current if node.tracker else "", self._default_workload(node), \
            node.load.current
        with self._lock:
            missing = [w for w in node.objectives if frontiers.key(w, load) not in node.frontiers]
        if missing:
            self._build(node_id, min(missing, key=lambda w: (w != wanted, w != default, w)), load)
            self._search_later(self._build_next, node_id)

    def _search_later(self, search, node_id: str, *args) -> None:
        """Queue ``search(node_id, *args)`` for the search thread, once per (node, search) and at most
        ``MAX_QUEUED_SEARCHES`` in all; it is skipped if the node is gone or away by its turn (nobody
        to plan for: it is queued again when the node registers)."""
        key = (node_id, search.__name__, *args[:2])
        with self._lock:
            if key in self._queued:
                return
            if len(self._queued) >= MAX_QUEUED_SEARCHES:
                log.warning("search queue full (%d waiting): %s of %s waits for its next registration",
                            MAX_QUEUED_SEARCHES, search.__name__, node_id)
                return
            self._queued.add(key)

        def run():
            with self._lock:
                self._queued.discard(key)
            if node_id in self._nodes and self._connected(node_id):
                search(node_id, *args)

        self._work.submit(run).add_done_callback(  # a search that raises is said, not lost in its future
            lambda f: not f.cancelled() and f.exception()
            and log.error("%s of %s failed", search.__name__, node_id, exc_info=f.exception()))

    def _build(self, node_id: str, workload: str, load: int) -> None:
        node = self._nodes[node_id]
        objectives = node.objectives[workload]
        target = objectives.latency_target_ns(Service(load, self.settings.latency_target_ns), node.inflection_ns)
        service = Service(load, target, self.settings.throughput_target)
        built = frontiers.build(objectives, service, self.settings.search, self.settings.frontier_points)
        with self._lock:
            node.frontiers[built.key] = built
        self._save_frontiers(node)
        log.info("frontier of %s for %r at %d streams: %d budgets", node_id, workload, load, len(built.points))
        self._replan(node_id, f"frontier for workload {workload!r} at {streams(load)} searched")

    def _refine(self, node_id: str, key: str, budget: int, near: Found) -> None:
        node = self._nodes[node_id]
        with self._lock:
            frontier = node.frontiers.get(key)
            current = frontier.at(budget) if frontier else None
            if current is None or (current.budget_bytes == budget and not self._unverified(current)):
                return
        objectives = node.objectives[frontier.workload]
        verifier = self._verifier(node.fingerprint) if self.settings.verify > 1 else None
        if verifier is None:
            found = search(objectives, budget, frontier.service, self.settings.search, [near])
        else:  # measured before pushed: the near ties are scored
            ranked = candidates(objectives, budget, frontier.service, self.settings.search, [near], self.settings.verify)
            error = self._accuracy[node.fingerprint].held_out_error.get(frontier.workload, 0.0)
            found = verify(ranked, error, lambda f: verifier.accuracy(configuration(f, objectives.num_experts),
                                                                      frontier.workload))
        with self._lock:
            frontier.add(found)
        self._save_frontiers(node)
        if node.budget == budget:  # else the budget changed meanwhile: the point stays in the frontier
            self._replan(node_id, f"{'verified' if found.verified else 'refined'} search at budget "
                                  f"{format_size(budget)}")

    def _unverified(self, found: Found) -> bool:
        return self.settings.verify > 1 and not found.verified

    def _verifier(self, fingerprint: str) -> Verifier | None:
        """The model's verifier (None, said once, where its checkpoint or torch is not on this host)."""
        if fingerprint not in self._verifiers:
            self._verifiers[fingerprint] = verifier_for(self._accuracy[fingerprint])
        return self._verifiers[fingerprint]

    def _replan(self, node_id: str, why: str) -> None:
        self._on_plan_ready(node_id, why)

    # --- helpers ----------------------------------------------------------------------
    def _node(self, node_id: str, fingerprint: str, memory: MemoryModel) -> _Node:
        node = self._nodes.get(node_id)
        if node is None or node.fingerprint != fingerprint or node.memory != memory:  # a new model or reserve
            node = self._nodes[node_id] = _Node(fingerprint, memory, load=LoadTracker(memory.reserve.max_rows))
        return node

    def _lookup(self, node: _Node, record) -> tuple[str, frontiers.Frontier | None]:
        """The workload planned for and the frontier to answer ``record`` from: the recognised
        workload's, else the default workload's while the other is searched; of those, the one
        searched for the offered load nearest the one seen."""
        wanted, default, load = record.workload or self._default_workload(node), self._default_workload(node), \
            node.load.current
        with self._lock:
            pool = [f for f in node.frontiers.values() if f.workload == wanted] or \
                [f for f in node.frontiers.values() if f.workload == default]
        if not pool:
            return wanted, None
        return wanted, min(pool, key=lambda f: (abs(f.service.offered_load - load), f.service.offered_load))

    def _default_workload(self, node: _Node) -> str:
        accuracy = self._accuracy.get(node.fingerprint)
        return accuracy.default_workload if accuracy else ""

    def _fallback_reason(self, node: _Node, workload: str) -> str:
        if not node.fingerprint:
            return "fallback: the executor did not say which model it serves"
        if node.fingerprint not in self._accuracy:
            return f"fallback: no accuracy profile of model {node.fingerprint}"
        if node.profile_state != "ready":
            return f"fallback: device profile {node.profile_state}"
        return f"fallback: frontier for workload {workload!r} being searched"

    def _save_frontiers(self, node: _Node) -> None:
        with self._lock:
            kept = dict(node.frontiers)
        self.files.save_frontiers(node.key, kept)

    def _load_frontiers(self, node: _Node) -> set[str]:
        loaded = self.files.load_frontiers(node.key, node.objectives)
        with self._lock:
            node.frontiers.update(loaded)
        return set(loaded)
