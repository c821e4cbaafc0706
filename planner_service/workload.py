"""Recognising the workload a device serves from its expert telemetry.

Each profiled workload left a histogram per layer: the share of routed tokens each expert got
(``profiler.accuracy.workload_histograms``). An executor reports the tokens routed to each
expert since its previous report; over a window of recent reports, the workload whose
histograms make those counts most likely (multinomial log-likelihood per routed token, summed
over layers) is the one it serves. A mixed stream is most likely under the mix's histograms,
which are the domains' average.

Hysteresis, so a plan does not flap: the recognised workload changes only when another one is
more likely by ``margin`` nats per token, in ``confirm`` reports in a row, with at least
``min_tokens`` tokens in the window. The first decision needs only the tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

SMOOTHING = 1e-3  # share given to an expert a histogram never saw, so no count is impossible


@dataclass(frozen=True, slots=True)
class Hysteresis:
    window: int = 4  # reports
    min_tokens: int = 32  # routed tokens of a layer in the window, before any decision
    margin: float = 0.05  # nats per token (summed over layers) a challenger must win by
    # Reports in a row it must win: near the window's length, so the passing mixture of two
    # domains while the window turns over from one to the other is not pushed as the mix.
    confirm: int = 3


@dataclass
class Streak:
    """A challenger to what is in force and the reports in a row it has won: it takes over after
    ``confirm`` of them, so a plan does not flap."""

    name: object = None
    wins: int = 0

    def won(self, name, confirm: int) -> bool:
        """``name`` won this report; True (and the streak starts over) once it has won ``confirm``
        in a row."""
        self.wins, self.name = (self.wins + 1 if name == self.name else 1), name
        if self.wins < confirm:
            return False
        self.reset()
        return True

    def reset(self) -> None:
        self.name, self.wins = None, 0


@dataclass
class WorkloadTracker:
    """One executor's recent expert activations and the workload recognised in them."""

    histograms: Mapping[str, Sequence[Sequence[float]]]
    settings: Hysteresis = field(default_factory=Hysteresis)
    current: str = ""
    why: str = ""
    _reports: deque = field(default_factory=deque)
    _streak: Streak = field(default_factory=Streak)

    def __post_init__(self):
        self._log_shares = {w: _log_shares(h) for w, h in self.histograms.items()}

    def observe(self, activations: Sequence[Sequence[int]]) -> bool:
        """Add one report (tokens per expert per layer since the last one); returns True when the
        recognised workload changed."""
        counts = np.asarray(activations, dtype=float)
        if not self._log_shares or counts.shape != next(iter(self._log_shares.values())).shape:
            return False  # a report of another layout: nothing to compare
        self._reports.append(counts)
        while len(self._reports) > self.settings.window:
            self._reports.popleft()
        window = sum(self._reports)
        tokens = window.sum(axis=1).min()
        if tokens < self.settings.min_tokens:
            return False
        scores = self.likelihoods(window)
        best = max(scores, key=scores.get)
        if not self.current:
            return self._switch(best, scores, tokens)
        if best == self.current or scores[best] - scores[self.current] < self.settings.margin:
            self._streak.reset()
            return False
        if not self._streak.won(best, self.settings.confirm):
            return False
        return self._switch(best, scores, tokens)

    def likelihoods(self, counts: np.ndarray) -> dict[str, float]:
        """Mean log-likelihood per routed token of ``counts`` [layers, experts], summed over layers."""
        per_layer = np.maximum(counts.sum(axis=1), 1.0)
        return {w: float(((counts * logs).sum(axis=1) / per_layer).sum()) for w, logs in self._log_shares.items()}

    def _switch(self, workload: str, scores: dict[str, float], tokens: float) -> bool:
        previous, self.current = self.current, workload
        self._streak.reset()
        ranked = sorted(scores, key=scores.get, reverse=True)
        runner = ranked[1] if len(ranked) > 1 else workload
        self.why = (f"expert activations of the last {len(self._reports)} reports ({int(tokens)}+ tokens per layer) "
                    f"fit {workload!r} best ({scores[workload] - scores[runner]:+.3f} nats/token over {runner!r})")
        return workload != previous


def _log_shares(histogram: Sequence[Sequence[float]]) -> np.ndarray:
    shares = np.asarray(histogram, dtype=float) + SMOOTHING
    return np.log(shares / shares.sum(axis=1, keepdims=True))


@dataclass
class LoadTracker:
    """The offered load an executor serves, from its throughput reports (requests running and
    waiting): a class of 1, 2, 4, ... streams up to its full batch, the smallest holding the
    mean of the last ``window`` reports. It changes when ``confirm`` reports in a row point to
    another class, so a plan's rows follow the load without flapping; idle reports (nothing
    running or waiting) say nothing about the load the device serves and are left out."""

    max_rows: int
    window: int = 5
    confirm: int = 5
    current: int = 1
    why: str = ""
    _reports: deque = field(default_factory=deque)
    _streak: Streak = field(default_factory=Streak)

    def observe(self, running: int, waiting: int) -> bool:
        """Add one report; returns True when the load class changed."""
        if running + waiting <= 0:
            return False
        self._reports.append(running + waiting)
        while len(self._reports) > self.window:
            self._reports.popleft()
        mean = sum(self._reports) / len(self._reports)
        seen = self.load_class(mean)
        if seen == self.current:
            self._streak.reset()
            return False
        if not self._streak.won(seen, self.confirm):
            return False
        previous, self.current = self.current, seen
        self.why = (f"offered load {previous} -> {streams(seen)} (mean {mean:.1f} requests running or waiting "
                    f"over the last {len(self._reports)} reports)")
        return True

    def load_class(self, streams: float) -> int:
        """The smallest of 1, 2, 4, ... (at most ``max_rows``) that holds ``streams``."""
        size = 1
        while size < streams and size < self.max_rows:
            size *= 2
        return min(size, max(1, self.max_rows))


def streams(count: int) -> str:
    return f"{count} stream{'' if count == 1 else 's'}"
