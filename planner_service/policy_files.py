"""Where the planner's policy keeps what it measured and searched: device profiles and frontiers
under its state directory (``DIR/profiles``, ``DIR/frontiers``), and where it finds accuracy
profiles. A full disk costs only the copy (measured or searched again after a restart), never
the plan it feeds; without a state directory nothing is kept."""

from __future__ import annotations

import logging
from pathlib import Path

from swapmoe.models.bundled import PROFILES as SHIPPED_PROFILES
from swapmoe.planner_service import frontier as frontiers
from swapmoe.planner_service import profiles
from swapmoe.profiler import report

log = logging.getLogger(__name__)


class PolicyFiles:
    def __init__(self, state_dir: Path | None, accuracy_roots: tuple[Path, ...], shipped_profiles: bool):
        self.state_dir, self.accuracy_roots, self.shipped_profiles = state_dir, accuracy_roots, shipped_profiles

    @property
    def profile_root(self) -> Path | None:
        return self.state_dir / "profiles" if self.state_dir else None

    def find_accuracy(self) -> dict[str, profiles.AccuracyProfile]:
        """The accuracy profiles of the roots given (and the state directory's), then those shipped
        with the bundled models for a model none of those has."""
        roots = list(self.accuracy_roots) + ([self.profile_root] if self.profile_root else [])
        found = profiles.find_accuracy(roots)
        return {**profiles.find_accuracy([SHIPPED_PROFILES]), **found} if self.shipped_profiles else found

    def load_device(self, fingerprint: str, node_id: str):
        return profiles.load_device(self.profile_root, fingerprint, node_id) if self.profile_root else None

    def save_device(self, device) -> None:
        self._keep(lambda: report.save_device(self.profile_root, device), f"device profile of {device.node_id}")

    def save_frontiers(self, key: str, kept: dict[str, frontiers.Frontier]) -> None:
        path = self._frontier_path(key)
        self._keep(lambda: frontiers.save(path, key, kept), str(path))

    def load_frontiers(self, key: str, workloads) -> dict[str, frontiers.Frontier]:
        path = self._frontier_path(key)
        return frontiers.load(path, workloads) if path is not None else {}

    def _frontier_path(self, key: str) -> Path | None:
        return self.state_dir / "frontiers" / f"{key}.json" if self.state_dir else None

    def _keep(self, write, what: str) -> None:
        if self.state_dir is None:
            return
        try:
            write()
        except OSError as error:
            log.warning("cannot store the %s (%s): kept in memory only", what, error)
