"""Accuracy profiling on Ray (paper section 3.4.2): score random configurations in parallel.

Each Ray actor holds one ``Scorer`` (one runtime); the driver hands out configurations as
actors free up, so a slow worker gets fewer. An actor that dies is restarted by Ray and its
task retried; results are appended to ``scores.jsonl`` by the driver only, as each arrives,
so a crash loses at most the configurations in flight and a rerun skips what is there.

The driver builds the expert store before any actor starts (actors find it built, and no two
build the same store at once). ``max_resident_bytes`` caps each actor's expert slots, so that
actors of a paper-size model fit beside each other (``profiler.residency``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from swapmoe.core.layout import ModelLayout
from swapmoe.profiler import artifacts, residency
from swapmoe.profiler.configs import Configuration, sample_many
from swapmoe.profiler.workloads import ProfilingSet

IN_FLIGHT_PER_WORKER = 2  # one running, one waiting: no worker idles between results


@dataclass(slots=True)
class AccuracyRun:
    checkpoint: Path
    profiling_set: ProfilingSet
    configurations: int = 64  # random configurations, besides the full model as the reference
    seed: int = 0
    workers: int = 0  # actors; 0: one per CPU Ray has
    root: Path = dataclasses.field(default_factory=artifacts.default_root)
    ray_address: str | None = None  # an existing cluster; None: a local Ray
    store_root: Path | None = None  # where the expert store is built (by the driver, before the workers start)
    max_resident_bytes: int = 0  # expert slot bytes one worker may hold; 0: no cap (see profiler.residency)

    def __post_init__(self):
        if self.configurations < 1:
            raise ValueError("configurations must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 (one per CPU) or more")
        if self.max_resident_bytes < 0:
            raise ValueError("max_resident_bytes must be 0 (no cap) or more")


def start_ray(address: str | None = None, cpus: int | None = None) -> None:
    """Join ``address`` or start a local Ray (no dashboard), unless this process already has one."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def _worker_class():
    import ray

    @ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)
    class ScoringWorker:
        """One runtime, scoring the configurations it is given (one torch thread: one core)."""

        def __init__(self, checkpoint: str, profiling_set: ProfilingSet, store_root: str | None,
                     max_resident_bytes: int):
            from swapmoe.profiler.scoring import Scorer

            self.scorer = Scorer(Path(checkpoint), profiling_set, Path(store_root) if store_root else None,
                                 max_resident_bytes=max_resident_bytes)

        def layout(self) -> ModelLayout:
            return self.scorer.layout

        def pid(self) -> int:
            import os

            return os.getpid()

        def score(self, key: str):
            return self.scorer.score(Configuration.from_key(key))

    return ScoringWorker


class AccuracyProfiler:
    """Runs an ``AccuracyRun``; ``workers`` are its Ray actors while it runs."""

    def __init__(self, run: AccuracyRun, log: Callable[[str], None] = print):
        self.run = run
        self.log = log
        config = Path(run.checkpoint) / "config.json"
        if not config.is_file():
            raise ValueError(f"{run.checkpoint} is not a checkpoint directory (no config.json)")
        run.profiling_set.check_fits(bool(json.loads(config.read_text()).get("is_encoder_decoder")), str(run.checkpoint))
        self.layout = residency.checkpoint_layout(run.checkpoint)
        residency.check_cap(self.layout, run.max_resident_bytes)  # before Ray and the store
        import torch

        from swapmoe.executor.adapters import with_precisions
        from swapmoe.executor.store import Manifest
        from swapmoe.executor.store_build import ensure_store

        # Built once here, not by each worker at once; its manifest holds the checkpoint's fingerprint.
        store = ensure_store(run.checkpoint, run.store_root, log=log)
        manifest = Manifest.load(store)
        self.fingerprint = manifest.model_fingerprint
        # The lower precisions the store keeps, as the workers' runtimes describe them: configurations draw them.
        self.layout = with_precisions(self.layout, SimpleNamespace(manifest=manifest), torch.device("cpu"))
        self.directory = artifacts.accuracy_dir(run.root, self.fingerprint, run.profiling_set.name)
        self.workers: list = []

    @property
    def scores_path(self) -> Path:
        return self.directory / artifacts.SCORES

    def configurations(self) -> list[Configuration]:
        """The full model first (the reference, and the workloads' activation histograms), then the
        seed's first random configurations (at the precisions the store keeps) whose slots fit
        ``max_resident_bytes``."""
        layout, cap = self.layout, self.run.max_resident_bytes
        full = Configuration(residency.full(layout), 0)

        def keep(config: Configuration) -> bool:
            return config != full and residency.fits(layout, config.experts_per_layer, cap, config.precision)

        return [full] + sample_many(full.experts_per_layer, self.run.configurations, self.run.seed, keep,
                                    layout.precisions)

    def __call__(self, progress: bool = True, on_result: Callable[[dict], None] = lambda row: None) -> list[dict]:
        """Score what is not scored yet; returns every row of ``scores.jsonl``."""
        import ray
        from tqdm import tqdm

        start_ray(self.run.ray_address, self.run.workers or None)
        self.workers = self._start_workers()
        try:
            layers = ray.get(self.workers[0].layout.remote()).layers  # what the workers check caps against
            assert layers == self.layout.layers, f"the runtime's layers {layers} differ from {self.layout.layers}"
            configurations = self.configurations()
            self.reference_key = configurations[0].key
            self._write_profile()
            done = {row["key"] for row in artifacts.read_scores(self.scores_path)}
            todo = [c.key for c in configurations if c.key not in done]
            if done:
                self.log(f"resuming: {len(done)} configurations already scored in {self.scores_path}")
            with tqdm(total=len(todo), desc="scoring configurations", unit="config", disable=not progress) as bar:
                self._dispatch(todo, bar, on_result)
        finally:
            for actor in self.workers:
                ray.kill(actor)
            self.workers = []
        return artifacts.read_scores(self.scores_path)

    def _start_workers(self) -> list:
        import ray

        run = self.run
        count = run.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        worker = _worker_class()
        return [worker.remote(str(run.checkpoint), run.profiling_set, str(run.store_root) if run.store_root else None,
                              run.max_resident_bytes)
                for _ in range(count)]

    def _dispatch(self, todo: list[str], bar, on_result) -> None:
        import ray

        pending = {}  # object ref -> (key, worker index)
        queue = list(reversed(todo))
        busy = [0] * len(self.workers)

        def hand_out():
            for index in range(len(self.workers)):
                while queue and busy[index] < IN_FLIGHT_PER_WORKER:
                    key = queue.pop()
                    pending[self.workers[index].score.remote(key)] = (key, index)
                    busy[index] += 1

        hand_out()
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            key, index = pending.pop(ref)
            busy[index] -= 1
            score = ray.get(ref)
            config = Configuration.from_key(key)
            row = dict(key=key, experts_per_layer=list(config.experts_per_layer),
                       update_frequency=config.update_frequency, accuracy=score.accuracy, totals=score.totals,
                       seconds=round(score.seconds, 3), finished=time.time())
            if config.precision:
                row["precision"] = list(config.precision)
            if key == self.reference_key:
                row["activations"] = score.activations
            artifacts.append_score(self.scores_path, row)
            bar.update(1)
            on_result(row)
            hand_out()

    def _write_profile(self) -> None:
        path = self.directory / "profile.json"
        body = dict(model_fingerprint=self.fingerprint, checkpoint=str(self.run.checkpoint),
                    profiling_set=dataclasses.asdict(self.run.profiling_set), seed=self.run.seed,
                    num_experts=list(residency.full(self.layout)), precisions=list(self.layout.precisions),
                    max_resident_bytes=self.run.max_resident_bytes,
                    sampling="swapmoe.profiler.configs (see its docstring)")
        if path.exists():
            artifacts.read_json(path, "accuracy-profile", self.fingerprint)
        artifacts.write_json(path, "accuracy-profile", body)


def workload_histograms(rows: list[dict]) -> dict[str, list[list[float]]]:
    """Per workload and layer, the share of routed tokens each expert was wanted by, from the
    full model's run: what the planner matches an executor's telemetry against."""
    reference = next((r for r in rows if "activations" in r), None)
    if reference is None:
        return {}
    out = {}
    for workload, layers in reference["activations"].items():
        counts = np.asarray(layers, dtype=float)
        out[workload] = (counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)).round(6).tolist()
    return out
