"""Accuracy profiling on Ray (paper section 3.4.2): score random configurations in parallel.

Each Ray actor holds one ``Scorer`` (one runtime); the driver hands out configurations as
actors free up, so a slow worker gets fewer. An actor that dies is restarted by Ray and its
task retried; results are appended to ``scores.jsonl`` by the driver only, as each arrives,
so a crash loses at most the configurations in flight and a rerun skips what is there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from swapmoe.core.fingerprint import model_fingerprint
from swapmoe.profiler import artifacts
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
    store_root: Path | None = None  # where workers build the expert store

    def __post_init__(self):
        if self.configurations < 1:
            raise ValueError("configurations must be at least 1")
        if self.workers < 0:
            raise ValueError("workers must be 0 (one per CPU) or more")


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

        def __init__(self, checkpoint: str, profiling_set: ProfilingSet, store_root: str | None):
            from swapmoe.profiler.scoring import Scorer

            self.scorer = Scorer(Path(checkpoint), profiling_set, Path(store_root) if store_root else None)

        def layers(self) -> list[int]:
            return [l.num_experts for l in self.scorer.layout.layers]

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
        self.fingerprint = model_fingerprint(run.checkpoint)
        self.directory = artifacts.accuracy_dir(run.root, self.fingerprint, run.profiling_set.name)
        self.workers: list = []

    @property
    def scores_path(self) -> Path:
        return self.directory / artifacts.SCORES

    def configurations(self, num_experts: list[int]) -> list[Configuration]:
        """The full model first (the reference, and the workloads' activation histograms), then the
        seed's random configurations."""
        full = Configuration(tuple(num_experts), 0)
        return [full] + [c for c in sample_many(num_experts, self.run.configurations, self.run.seed) if c != full]

    def __call__(self, progress: bool = True, on_result: Callable[[dict], None] = lambda row: None) -> list[dict]:
        """Score what is not scored yet; returns every row of ``scores.jsonl``."""
        import ray
        from tqdm import tqdm

        start_ray(self.run.ray_address, self.run.workers or None)
        count = self.run.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        worker = _worker_class()
        self.workers = [worker.remote(str(self.run.checkpoint), self.run.profiling_set,
                                      str(self.run.store_root) if self.run.store_root else None)
                        for _ in range(count)]
        try:
            num_experts = ray.get(self.workers[0].layers.remote())
            self.reference_key = Configuration(tuple(num_experts), 0).key
            self._write_profile(num_experts)
            done = {row["key"] for row in artifacts.read_scores(self.scores_path)}
            todo = [c.key for c in self.configurations(num_experts) if c.key not in done]
            if done:
                self.log(f"resuming: {len(done)} configurations already scored in {self.scores_path}")
            with tqdm(total=len(todo), desc="scoring configurations", unit="config", disable=not progress) as bar:
                self._dispatch(todo, bar, on_result)
        finally:
            for actor in self.workers:
                ray.kill(actor)
            self.workers = []
        return artifacts.read_scores(self.scores_path)

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
            if key == self.reference_key:
                row["activations"] = score.activations
            artifacts.append_score(self.scores_path, row)
            bar.update(1)
            on_result(row)
            hand_out()

    def _write_profile(self, num_experts: list[int]) -> None:
        path = self.directory / "profile.json"
        body = dict(model_fingerprint=self.fingerprint, checkpoint=str(self.run.checkpoint),
                    profiling_set=dataclasses.asdict(self.run.profiling_set), seed=self.run.seed,
                    num_experts=num_experts, sampling="swapmoe.profiler.configs (see its docstring)")
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
