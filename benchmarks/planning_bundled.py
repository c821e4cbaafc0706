"""The bundled LM's planning objectives, budgets and allocations, as ``benchmarks.planning``'s
parts use them (its stored profiles, the planner's default latency target)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.plan import Strategy
from swapmoe.planner_service import profiles
from swapmoe.planner_service.objectives import Objectives, Service, inflection_latency_ns
from swapmoe.profiler.configs import Configuration, allocate
from swapmoe.profiler.report import load_device
from swapmoe.profiler.workloads import MIX

from benchmarks.planning_report import ACCURACY_DIR, DEVICE_DIR, HERE

SHARES = (0.25, 0.5, 0.75)  # of all experts: the budgets every part plans for
MG = Strategy.MASKED_GATING


# --- the bundled LM's objectives, budgets and allocations -----------------------------------
@dataclass(frozen=True)
class Bundled:
    """The planner's objectives for the bundled LM on the benchmark machine, per workload."""

    objectives: dict[str, Objectives]
    memory: MemoryModel
    inflection: int
    target_ns: float  # the planner's default latency target
    sweep_experts: tuple[int, ...]  # the device profile's no-update baseline ran at this residency
    single: Objectives | None  # the mix objectives with one network for E_accuracy (None: the planner's is one)
    provenance: dict

    @property
    def mix(self) -> Objectives:
        return self.objectives[MIX]

    @property
    def service(self) -> Service:
        """One stream at the planner's default latency target."""
        return Service(latency_target_ns=self.target_ns)

    @property
    def model_name(self) -> str:
        members = getattr(self.mix.accuracy, "members", ())
        return f"ensemble of {len(members)} networks" if len(members) > 1 else "one network"

    @property
    def capacity(self) -> tuple[int, ...]:
        return self.mix.num_experts

    def masked(self, frequencies: tuple[int, ...] | None = None, single: bool = False) -> Objectives:
        """The mix objectives restricted to virtual experts (and to ``frequencies``); with
        ``single``, E_accuracy's first network alone."""
        extra = dict(update_frequencies=frequencies) if frequencies else {}
        return dataclasses.replace(self.single if single else self.mix, strategies=(MG,), **extra)

    def searches(self) -> dict[str, bool]:
        """The searches compared: role -> single network or not."""
        return {"searched": False, **({"searched, one network": True} if self.single else {})}

    def predict(self, config: Configuration) -> dict[str, float]:
        """E_accuracy of a masked-gating configuration, per workload."""
        return {w: float(o.predict_one(MG, config.update_frequency, config.experts_per_layer).accuracy)
                for w, o in self.objectives.items()}

    def predict_single(self, config: Configuration) -> float | None:
        """The mix E_accuracy of one network alone (None: the planner's is one network)."""
        if self.single is None:
            return None
        return float(self.single.predict_one(MG, config.update_frequency, config.experts_per_layer).accuracy)


def load_bundled() -> Bundled:
    accuracy = profiles.load_accuracy(ACCURACY_DIR)
    device = load_device(DEVICE_DIR, accuracy.fingerprint)
    memory = MemoryModel(device.layout, Reserve())
    objectives = profiles.objectives(accuracy, device, memory)
    target = inflection_latency_ns(objectives[MIX].latency, device.inflection_update_frequency)
    members = getattr(objectives[MIX].accuracy, "members", ())
    single = dataclasses.replace(objectives[MIX], accuracy=members[0]) if len(members) > 1 else None
    body = (ACCURACY_DIR / "e_accuracy.json").read_bytes()
    provenance = dict(e_accuracy_sha256=hashlib.sha256(body).hexdigest()[:16], git=_git_state())
    return Bundled(objectives, memory, device.inflection_update_frequency, target, device.sweep_experts_per_layer,
                   single, provenance)


def _git_state() -> str:
    """The commit, and whether the planner or profiler had uncommitted changes."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "planner_service", "profiler", "core", str(ACCURACY_DIR))
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def experts_at(share: float, capacity) -> int:
    return round(share * sum(capacity))


def even(total: int, capacity) -> tuple[int, ...]:
    return allocate(total, np.ones(len(capacity)), capacity)


def budget_for(memory: MemoryModel, total: int) -> int:
    """The bytes of ``total`` experts (the even split's; equal-sized experts: any split's)."""
    return memory.plan_bytes(even(total, [l.num_experts for l in memory.layout.layers]))


def random_allocations(total: int, capacity, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` splits of ``total`` experts as ``profiler.configs.sample`` draws them: Dirichlet
    shares whose concentration is log-uniform in 0.1-30, through ``allocate``."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, total, i])
        shares = rng.dirichlet(np.full(len(capacity), 10 ** rng.uniform(-1, np.log10(30))))
        out.append(allocate(total, shares, capacity))
    return out
