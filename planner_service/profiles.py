"""Where the planner's performance models come from, and the objectives built from them.

Accuracy profiles (one per model, made with ``swapmoe profile accuracy``) are read from the
profile directories the planner is given; device profiles (one per executor) are measured
through its Connect stream and kept under the planner's own profile directory, so a restarted
planner need not measure again. Both use the profiler's artifact layout and loaders: JSON,
checked against the model's fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from swapmoe.core.budget import MemoryModel
from swapmoe.core.device_profile import DeviceProfile
from swapmoe.planner_service.objectives import Objectives
from swapmoe.profiler import artifacts, report
from swapmoe.profiler.performance_models import AccuracyEnsemble, fit_latency

log = logging.getLogger(__name__)
E_ACCURACY = "e_accuracy.json"
PREFERRED_WORKLOAD = "mix"  # planned for until a device's workload is recognised


@dataclass(frozen=True)
class AccuracyProfile:
    """E_accuracy per workload of one model, with the full model's accuracy and the expert
    histograms the workloads are recognised by."""

    fingerprint: str
    directory: Path
    models: dict[str, AccuracyEnsemble]
    reference: dict[str, float]
    histograms: dict[str, tuple[tuple[float, ...], ...]]
    digest: str = ""  # of the stored models: frontiers searched with other models are stale
    held_out_error: dict[str, float] = field(default_factory=dict)  # E_accuracy's mean relative error per workload
    checkpoint: Path | None = None  # the model scored, where the planner's host has it (None: not here)
    profiling_set: dict = field(default_factory=dict)  # what it was scored on (profiler.workloads.ProfilingSet)

    @property
    def default_workload(self) -> str:
        return PREFERRED_WORKLOAD if PREFERRED_WORKLOAD in self.models else sorted(self.models)[0]


def load_accuracy(directory: Path) -> AccuracyProfile:
    body = artifacts.read_json(directory / E_ACCURACY, report.E_ACCURACY_KIND)
    models = report.load_accuracy_ensembles(directory, body["model_fingerprint"])
    if not models:
        raise artifacts.ProfileError(f"{directory / E_ACCURACY} holds no workload")
    histograms = {w: tuple(tuple(float(x) for x in layer) for layer in h) for w, h in body["histograms"].items()}
    digest = hashlib.sha256((directory / E_ACCURACY).read_bytes()).hexdigest()[:16]
    errors = {w: float(part.get("held_out_error", {}).get("ensemble", {}).get("mean_relative_error", 0.0))
              for w, part in body.get("workloads", {}).items()}
    scored = _scored(directory)
    return AccuracyProfile(body["model_fingerprint"], directory, models,
                           {w: float(v) for w, v in body["reference_accuracy"].items()}, histograms, digest, errors,
                           _checkpoint(scored.get("checkpoint", ""), directory), dict(scored.get("profiling_set", {})))


def _scored(directory: Path) -> dict:
    """The profile's own record (``profile.json``: the checkpoint and set it scored); {} if unreadable."""
    try:
        return artifacts.read_json(directory / "profile.json", "accuracy-profile")
    except (artifacts.ProfileError, OSError, ValueError):
        return {}


def _checkpoint(recorded: str, directory: Path) -> Path | None:
    """The checkpoint a profile scored, if this host has it: for a profile shipped with the bundled
    models, the bundled model of that name (it was made on another machine); else where it was
    (the verifier checks its fingerprint either way)."""
    from swapmoe.models.bundled import MODELS

    shipped = MODELS / Path(recorded).name
    candidates = (shipped, Path(recorded)) if directory.resolve().is_relative_to(MODELS) else (Path(recorded),)
    for path in candidates if recorded else ():
        if (path / "config.json").is_file():
            return path
    return None


def find_accuracy(roots: Iterable[Path]) -> dict[str, AccuracyProfile]:
    """Every readable accuracy profile under ``roots`` (``ROOT/<fingerprint>/accuracy/<set>/``),
    by model fingerprint; where a model has several, the one scored on most configurations."""
    found: dict[str, tuple[int, AccuracyProfile]] = {}
    for root in roots:
        for path in sorted(Path(root).glob(f"*/accuracy/*/{E_ACCURACY}")):
            try:
                profile = load_accuracy(path.parent)
                size = int(artifacts.read_json(path, report.E_ACCURACY_KIND).get("configurations", 0))
            except (artifacts.ProfileError, OSError, KeyError, TypeError, ValueError) as error:
                log.warning("ignoring accuracy profile %s: %s", path.parent, error)
                continue
            if profile.fingerprint not in found or size > found[profile.fingerprint][0]:
                found[profile.fingerprint] = (size, profile)
    return {fp: profile for fp, (_, profile) in found.items()}


def load_device(root: Path, fingerprint: str, node_id: str) -> DeviceProfile | None:
    """The device profile stored for ``node_id`` serving ``fingerprint``, if any."""
    for directory in sorted((Path(root) / fingerprint / "devices").glob("*")):
        try:
            profile = report.load_device(directory, fingerprint)
        except (artifacts.ProfileError, OSError, KeyError, TypeError, ValueError) as error:
            log.warning("ignoring device profile %s: %s", directory, error)
            continue
        if profile.node_id == node_id:
            return profile
    return None


def objectives(accuracy: AccuracyProfile, device: DeviceProfile, memory: MemoryModel) -> dict[str, Objectives]:
    """One ``Objectives`` per profiled workload, for an executor with ``memory`` on ``device``."""
    latency = fit_latency(device)
    # A miss as the device measured it under on-demand loading; else (an older profile) a load's read time.
    load_ns = device.miss_ns() or min((l.expert_load_ns for l in device.loads), default=0)
    uniform = tuple(tuple(1.0 / l.num_experts for _ in range(l.num_experts)) for l in memory.layout.layers)
    return {w: Objectives(w, memory, model, latency, accuracy.reference[w], accuracy.histograms.get(w, uniform),
                          float(load_ns))
            for w, model in accuracy.models.items()}
