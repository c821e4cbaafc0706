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

import hashlib
import json
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
from swapmoe.models.bundled import PROFILES as SHIPPED_PROFILES
from swapmoe.planner_service import frontier as frontiers
from swapmoe.planner_service import profiles
from swapmoe.planner_service.objectives import Objectives, inflection_latency_ns
from swapmoe.planner_service.search import Found, SearchSettings, search
from swapmoe.planner_service.workload import Hysteresis, WorkloadTracker
from swapmoe.profiler import artifacts, report
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
    latency_target_ns: float | None = None  # None: the device's inflection point (section 3.4.1)
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
    target_ns: float = 0.0
    frontiers: dict[str, frontiers.Frontier] = field(default_factory=dict)
    tracker: WorkloadTracker | None = None
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
        self._accuracy = self._find_accuracy()
        self._scanned = time.monotonic()
        self._work = ThreadPoolExecutor(1, thread_name_prefix="planner-search")  # searches, one at a time
        self._queued: set[tuple] = set()  # (node id, what) of the searches waiting, each once
        self._profiling = ThreadPoolExecutor(4, thread_name_prefix="planner-profile")  # waits on devices

    # --- called by the registry, under its lock: fast, never searches ----------------
    def choose(self, record, why: str) -> Choice:
        budget = record.budget_bytes
        node = self._node(record.node_id, record.registration.model_fingerprint, record.memory_model)
        workload, found = self._lookup(node, record)
        node.budget = budget
        if found is None:
            reason = self._fallback_reason(node, workload)
            plan = record.memory_model.default_plan(budget, 0, f"planner:even-split budget={format_size(budget)} "
                                                               f"({reason})")
            return Choice(plan, f"{why}; {reason}: even split")
        if found.budget_bytes != budget:
            self._search_later(self._refine, record.node_id, workload, budget, found)
        origin = (f"planner:search workload={workload} budget={format_size(budget)} strategy={found.strategy.value} "
                  f"predicted={found.predicted.accuracy:.4g} {found.predicted.inter_token_ns / 1e6:.2f}ms")
        return Choice(found.plan(0, origin), f"{why}; searched plan for workload {workload!r}", found)

    def prepare(self, node_id: str, fingerprint: str, memory: MemoryModel) -> bool:
        """An executor registers: load what its plans need (stored device profile and frontiers)
        so ``choose`` can answer at once. Returns True when its device must be measured
        (``measure``, once it is registered)."""
        node = self._node(node_id, fingerprint, memory)
        if node.fingerprint and node.fingerprint not in self._accuracy and time.monotonic() - self._scanned > RESCAN_S:
            self._scanned = time.monotonic()  # a profile copied in since: looked for at most every RESCAN_S
            self._accuracy.update(self._find_accuracy())
        if node.fingerprint not in self._accuracy or node.profile_state in ("profiling", "ready"):
            return False
        root = self._profile_root()
        device = profiles.load_device(root, node.fingerprint, node_id) if root else None
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

    def recognises_workloads(self, node_id: str) -> bool:
        """Whether expert telemetry from ``node_id`` is of use: its model has an accuracy profile,
        whose per-workload histograms the reports are matched against."""
        node = self._nodes.get(node_id)
        return node is not None and node.fingerprint in self._accuracy

    def searched(self, record) -> bool:
        """Whether ``choose`` would answer ``record`` from a frontier."""
        node = self._nodes.get(record.node_id)
        return node is not None and self._lookup(node, record)[1] is not None

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
            self._keep(lambda: report.save_device(self._profile_root(), device), "device profile of " + node_id)
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
        node.target_ns = self.settings.latency_target_ns or \
            inflection_latency_ns(next(iter(node.objectives.values())).latency, device.inflection_update_frequency)
        node.key = _frontier_key(node, accuracy, device)
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
        wanted, default = node.tracker.current if node.tracker else "", self._default_workload(node)
        with self._lock:
            missing = [w for w in node.objectives if w not in node.frontiers]
        if missing:
            self._build(node_id, min(missing, key=lambda w: (w != wanted, w != default, w)))
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

        self._work.submit(run)

    def _build(self, node_id: str, workload: str) -> None:
        node = self._nodes[node_id]
        built = frontiers.build(node.objectives[workload], node.target_ns, self.settings.search,
                                self.settings.frontier_points)
        with self._lock:
            node.frontiers[workload] = built
        self._save_frontiers(node)
        log.info("frontier of %s for %r: %d budgets", node_id, workload, len(built.points))
        self._replan(node_id, f"frontier for workload {workload!r} searched")

    def _refine(self, node_id: str, workload: str, budget: int, near: Found) -> None:
        node = self._nodes[node_id]
        with self._lock:
            frontier = node.frontiers.get(workload)
            current = frontier.at(budget) if frontier else None
            if current is None or current.budget_bytes == budget:
                return
        found = search(node.objectives[workload], budget, node.target_ns, self.settings.search, [near])
        with self._lock:
            frontier.add(found)
        self._save_frontiers(node)
        if node.budget == budget:  # else the budget changed meanwhile: the point stays in the frontier
            self._replan(node_id, f"refined search at budget {format_size(budget)}")

    def _replan(self, node_id: str, why: str) -> None:
        self._on_plan_ready(node_id, why)

    # --- helpers ----------------------------------------------------------------------
    def _node(self, node_id: str, fingerprint: str, memory: MemoryModel) -> _Node:
        node = self._nodes.get(node_id)
        if node is None or node.fingerprint != fingerprint or node.memory != memory:
            node = self._nodes[node_id] = _Node(fingerprint, memory)  # a new model or budget reserve: start over
        return node

    def _lookup(self, node: _Node, record) -> tuple[str, Found | None]:
        """The workload planned for and the frontier's plan for ``record``'s budget: the recognised
        workload's frontier, else the default workload's while the other is searched."""
        wanted, default = record.workload or self._default_workload(node), self._default_workload(node)
        with self._lock:
            frontier = node.frontiers.get(wanted) or node.frontiers.get(default)
        if frontier is None:
            return wanted, None
        return frontier.workload, frontier.at(record.budget_bytes)

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

    def _find_accuracy(self) -> dict[str, profiles.AccuracyProfile]:
        """The accuracy profiles of the roots given (and the state directory's), then those shipped
        with the bundled models for a model none of those has."""
        roots = list(self.settings.accuracy_roots) + ([self._profile_root()] if self._profile_root() else [])
        found = profiles.find_accuracy(roots)
        return {**profiles.find_accuracy([SHIPPED_PROFILES]), **found} if self.settings.shipped_profiles else found

    def _profile_root(self) -> Path | None:
        return self.settings.state_dir / "profiles" if self.settings.state_dir else None

    def _frontier_path(self, node: _Node) -> Path | None:
        return self.settings.state_dir / "frontiers" / f"{node.key}.json" if self.settings.state_dir else None

    def _save_frontiers(self, node: _Node) -> None:
        path = self._frontier_path(node)
        with self._lock:
            body = {w: f.to_json() for w, f in node.frontiers.items()}
        self._keep(lambda: artifacts.write_json(path, "frontiers", dict(key=node.key, workloads=body)), str(path))

    def _keep(self, write, what: str) -> None:
        """Store a profile or frontiers when the planner has a state directory; a full disk costs only
        the copy (measured again, or searched again, after a restart), never the plan it feeds."""
        if self.settings.state_dir is None:
            return
        try:
            write()
        except OSError as error:
            log.warning("cannot store the %s (%s): kept in memory only", what, error)

    def _load_frontiers(self, node: _Node) -> set[str]:
        path = self._frontier_path(node)
        if path is None or not path.exists():
            return set()
        try:
            body = artifacts.read_json(path, "frontiers")
            loaded = {w: frontiers.Frontier.from_json(f) for w, f in body["workloads"].items() if w in node.objectives}
        except (artifacts.ProfileError, OSError, KeyError, TypeError, ValueError) as error:
            log.warning("ignoring stored frontiers %s: %s", path, error)
            return set()
        with self._lock:
            node.frontiers.update(loaded)
        return set(loaded)


def _frontier_key(node: _Node, accuracy: profiles.AccuracyProfile, device) -> str:
    """Frontiers are valid for one model, accuracy profile, device profile and memory model."""
    text = json.dumps([node.fingerprint, accuracy.digest, device.node_id, device.decode_step_ns,
                       node.memory.fixed_bytes, [l.bytes_per_expert for l in node.memory.layout.layers]])
    return hashlib.sha256(text.encode()).hexdigest()[:24]
