"""Measured before pushed: near-tied plans are scored before the planner settles on one.

E_accuracy's held-out error (6.4% mean, 2.9% median on the bundled LM's mix) is larger than the
gaps between the best plans near full residency, where the plan the models rank first is a coin
toss among a few. Where the search's next candidates are predicted within that error of its
answer, the planner scores them with the profiler's own runtime (``profiler.scoring.Scorer``:
masked gating, importance, updates, as the executor serves) on the profiling set the model was
fitted on, and keeps the best measured. Each configuration is scored once per planner process,
so neighbouring budgets and a fleet of one model share the cost.

Opt-in (``swapmoe planner serve --verify N``): it needs the model's checkpoint on the planner's
host and torch (the executor's extra), and it takes the planner's search thread for a few
seconds (bundled LM) to minutes (paper-size models) per candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

from swapmoe.core.plan import Strategy
from swapmoe.planner_service.search import Found
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.performance_models import lower_is_better

log = logging.getLogger(__name__)


def near_ties(candidates: Sequence[Found], error: float) -> list[Found]:
    """The first candidate and those predicted within ``error`` (relative) of its accuracy."""
    best = candidates[0].predicted.accuracy
    return [f for f in candidates if abs(f.predicted.accuracy - best) <= error * abs(best)]


def configuration(found: Found, num_experts: Sequence[int]) -> Configuration:
    """What scoring runs for a plan: on-demand loading is exact, the full model's output (at the
    plan's precision)."""
    if found.strategy is Strategy.ON_DEMAND:
        return Configuration(tuple(num_experts), 0, found.precision)
    return Configuration(found.experts_per_layer, found.update_frequency, found.precision)


def verify(candidates: Sequence[Found], error: float, measure: Callable[[Found], float]) -> Found:
    """The best measured of the near ties among ``candidates`` (best predicted first), its note
    saying what was measured; the first one as it is when no other is within ``error``."""
    ties = near_ties(candidates, error)
    if len(ties) < 2:
        return dataclasses.replace(candidates[0], verified=f"no other plan within the model's error ({error:.1%})")
    try:
        measured = [measure(f) for f in ties]
    except Exception as error:  # noqa: BLE001 - the search's answer stands; the note says why it is unmeasured
        log.warning("near ties not measured: %s", error)
        return dataclasses.replace(candidates[0], verified=f"not measured: {error}"[:200])
    sign = 1 if lower_is_better(ties[0].workload) else -1
    pick = min(range(len(ties)), key=lambda i: (sign * measured[i], i))
    return dataclasses.replace(ties[pick], verified=f"measured {measured[pick]:.4g} on the profiling set: best of "
                                                    f"{len(ties)} predicted within {error:.1%} (the first predicted "
                                                    f"measured {measured[0]:.4g})")


class Verifier:
    """Scores configurations of one model on its profiling set, each once (a cache by key)."""

    def __init__(self, checkpoint: Path, profiling_set, fingerprint: str):
        self.checkpoint, self.profiling_set, self.fingerprint = checkpoint, profiling_set, fingerprint
        self._scorer = None
        self._scores: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self.seconds = 0.0  # spent scoring, all told

    def accuracy(self, config: Configuration, workload: str) -> float:
        with self._lock:
            if config.key not in self._scores:
                score = self._scorer_now().score(config)
                self._scores[config.key] = score.accuracy
                self.seconds += score.seconds
                log.info("verified %s of %s: %s %.4g (%.1f s)", config.key, self.fingerprint, workload,
                         score.accuracy[workload], score.seconds)
            return self._scores[config.key][workload]

    def _scorer_now(self):
        if self._scorer is None:
            from swapmoe.profiler.scoring import Scorer

            scorer = Scorer(self.checkpoint, self.profiling_set)
            found = scorer.experts.store.manifest.model_fingerprint
            if found != self.fingerprint:
                scorer.close()
                raise ValueError(f"checkpoint {self.checkpoint} is model {found}, not {self.fingerprint}")
            self._scorer = scorer
        return self._scorer

    def close(self) -> None:
        with self._lock:
            if self._scorer is not None:
                self._scorer.close()
                self._scorer = None


def verifier_for(accuracy) -> Verifier | None:
    """A verifier of the model of ``accuracy`` (a ``profiles.AccuracyProfile``); None, said in the
    log, where its checkpoint or torch is not on this host."""
    try:
        if accuracy.checkpoint is None:
            raise FileNotFoundError("the checkpoint it was profiled with is not on this host")
        from swapmoe.profiler.workloads import ProfilingSet

        return Verifier(accuracy.checkpoint, ProfilingSet(**accuracy.profiling_set), accuracy.fingerprint)
    except (ImportError, OSError, TypeError, ValueError) as error:
        log.warning("plans of model %s are not verified: %s", accuracy.fingerprint, error)
        return None
