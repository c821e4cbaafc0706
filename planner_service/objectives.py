"""What the search optimises: the three performance models of one model on one device for one
workload (paper section 3.3), evaluated on many candidate plans at once.

A candidate is ``(strategy, update_frequency, rows, experts_per_layer, precision)`` as arrays.
Virtual experts (masked gating) trade accuracy for speed: E_accuracy predicts the first, E_latency
the second. On-demand loading is exact (the full model's accuracy) and pays a synchronous load for
every miss, so its latency depends on how often the device's tier is hit; that cost comes from
the device profile's load time and the workload's expert histogram.

Each layer's experts may be held at a lower precision (``executor.quantization``), one index per
layer into ``Objectives.precisions``: E_memory counts their bytes, E_accuracy was profiled with
them (a precision it was not profiled with is never searched), and E_latency scales a pass by the
device's measured pass time at each precision and a load by its bytes. On-demand at a lower
precision serves every expert at it: the full model at that precision, as E_accuracy predicts it.

Rows (sequences decoded together) compete with experts for the same bytes. What they buy depends
on what the device serves (``Service``): at an offered load of L streams, a plan of r rows runs
min(r, L) at once, each pass costing the device's measured batch ratio, and when L > r each
stream waits its turn (its time between tokens grows by L / r). Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from swapmoe.core.budget import MemoryModel
from swapmoe.core.plan import Strategy
from swapmoe.profiler.configs import UPDATE_FREQUENCIES, Configuration
from swapmoe.profiler.performance_models import AccuracyEnsemble, AccuracyModel, LatencyModel, lower_is_better

# The strategies a plan is searched over (skip has no accuracy profile: it drops tokens).
STRATEGIES = (Strategy.MASKED_GATING, Strategy.ON_DEMAND)


@dataclass(frozen=True, slots=True)
class Service:
    """What a device serves, that its plan is chosen for: ``offered_load`` concurrent streams (from
    its telemetry: running and waiting requests), the time between tokens each stream may see
    (None: the device's inflection point, section 3.4.1, at that load) and a throughput over all
    streams (tokens/s; 0: none asked)."""

    offered_load: int = 1
    latency_target_ns: float | None = None
    throughput_target: float = 0.0

    def __post_init__(self):
        if self.offered_load < 1 or self.throughput_target < 0:
            raise ValueError("offered_load must be at least 1 and throughput_target at least 0")


@dataclass(frozen=True, slots=True)
class Prediction:
    """The models' estimate of one plan at its service's offered load."""

    accuracy: float  # perplexity (lower is better) or Rouge-2 (higher is better)
    inter_token_ns: float  # per stream
    memory_bytes: int
    throughput: float = 0.0  # tokens/s over all streams

    @property
    def tokens_per_second(self) -> float:
        return 1e9 / self.inter_token_ns if self.inter_token_ns else 0.0


@dataclass(frozen=True, eq=False)
class Objectives:
    """E_memory, E_latency and E_accuracy of one (model, device, workload)."""

    workload: str
    memory: MemoryModel
    accuracy: AccuracyEnsemble | AccuracyModel
    latency: LatencyModel
    reference_accuracy: float  # the full model's, on this workload
    histogram: tuple[tuple[float, ...], ...]  # per layer, each expert's share of routed tokens
    load_ns: float  # one synchronous miss: measured under on-demand loading, else one read from the tier
    update_frequencies: tuple[int, ...] = UPDATE_FREQUENCIES
    strategies: tuple[Strategy, ...] = STRATEGIES

    @property
    def num_experts(self) -> tuple[int, ...]:
        return tuple(l.num_experts for l in self.memory.layout.layers)

    @cached_property
    def precisions(self) -> tuple[str, ...]:
        """The precisions a plan is searched over: the checkpoint's ("") and the lower ones the
        executor keeps that E_accuracy was profiled with, most bytes first."""
        layout, known = self.memory.layout, getattr(self.accuracy, "precisions", ())
        lower = [p for p in layout.precisions if p in known]
        return ("", *sorted(lower, key=lambda p: -layout.expert_bytes(self.num_experts, (p,) * layout.num_layers)))

    def precision_codes(self, precision: Sequence[str]) -> np.ndarray:
        """[layers]: per layer the index of its precision in ``precisions`` (empty: the checkpoint's)."""
        return np.array([self.precisions.index(p) for p in precision or ("",) * len(self.num_experts)], dtype=np.int64)

    def loss(self, accuracy: np.ndarray) -> np.ndarray:
        """What the search minimises: perplexity as is, Rouge-2 negated."""
        return accuracy if lower_is_better(self.workload) else -accuracy

    @property
    def max_rows(self) -> int:
        return self.memory.reserve.max_rows

    def predict(self, strategy: np.ndarray, frequency: np.ndarray, rows: np.ndarray, kept: np.ndarray,
                load: int = 1, precision: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """accuracy [N], inter-token ns per stream [N], memory bytes [N] and throughput (tokens/s) [N]
        at ``load`` streams for strategy indices [N] (into ``strategies``), update frequencies [N],
        rows [N] (0: a full batch of an executor that does not say its size, taken as one), kept
        [N, layers] and precision [N, layers] (indices into ``precisions``; None: the checkpoint's)."""
        kept, rows = np.asarray(kept, dtype=np.int64), np.asarray(rows, dtype=np.int64)
        codes = np.zeros_like(kept) if precision is None else np.asarray(precision, dtype=np.int64)
        on_demand = np.asarray(self.strategies)[strategy] == Strategy.ON_DEMAND
        accuracy = self._accuracy(on_demand, np.asarray(frequency), kept, codes)
        rows_run = np.maximum(rows, 1)
        together = np.minimum(rows_run, load)
        speed, loads = self.latency.precision_factors(codes, self.precisions)
        compute = self.latency.base_ns * self.latency.pass_ratio(together) * speed
        per_pass = np.where(on_demand, compute + self.misses_per_token(kept, loads) * self.load_ns * together,
                            compute + self.update_overhead_ns(frequency, kept, loads))
        latency = per_pass * np.maximum(1.0, load / rows_run)
        memory = e_memory_many(self.memory, kept, rows, codes, self.precisions)
        return accuracy, latency, memory, together * 1e9 / per_pass

    def _accuracy(self, on_demand: np.ndarray, frequency: np.ndarray, kept: np.ndarray,
                  codes: np.ndarray) -> np.ndarray:
        """E_accuracy of each plan: on demand, every expert (at the plan's precision) and no updates."""
        kept = np.where(on_demand[:, None], np.asarray(self.num_experts), kept)
        frequency = np.where(on_demand, 0, frequency)
        native = (codes == 0).all(axis=1)
        worse = np.maximum if lower_is_better(self.workload) else np.minimum
        if native.all():
            accuracy = self.accuracy.predict_arrays(kept, frequency)
        else:  # a lower precision never predicts better than the same experts at the checkpoint's
            accuracy = worse(self.accuracy.predict_arrays(kept, frequency, codes, self.precisions),
                             self.accuracy.predict_arrays(kept, frequency))
        # No plan beats the full model: the network's error near full residency must not pass for gain.
        accuracy = worse(accuracy, self.reference_accuracy)
        return np.where(native & (kept == self.num_experts).all(axis=1), self.reference_accuracy, accuracy)

    def predict_one(self, strategy: Strategy, frequency: int, kept: Sequence[int], rows: int = 1,
                    load: int = 1, precision: Sequence[str] = ()) -> Prediction:
        accuracy, latency, memory, throughput = self.predict(
            np.array([self.strategies.index(strategy)]), np.array([frequency]), np.array([rows]), np.array([kept]),
            load, self.precision_codes(precision)[None])
        return Prediction(float(accuracy[0]), float(latency[0]), int(memory[0]), float(throughput[0]))

    def latency_target_ns(self, service: Service, inflection_ns: float) -> float:
        """The time between tokens each stream may see: the service's, else the device's inflection
        latency (one stream) as it grows when every offered stream runs at once (at most a full
        batch; past it, streams take turns)."""
        if service.latency_target_ns is not None:
            return service.latency_target_ns
        together = min(service.offered_load, self.max_rows)
        ratio = float(self.latency.pass_ratio(together))
        return inflection_ns * ratio * max(1.0, service.offered_load / self.max_rows)

    def masked_latency(self, frequency: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """E_latency under virtual experts, vectorised (``LatencyModel.inter_token_ns``)."""
        return self.latency.base_ns + self.update_overhead_ns(frequency, kept)

    def update_overhead_ns(self, frequency: np.ndarray, kept: np.ndarray, loads: np.ndarray | None = None) -> np.ndarray:
        """What resident-set updates add to a pass: the sweep's fitted cost at the update rate,
        scaled by the share of layers that can load at all (each by ``loads`` [N, layers], its load
        time over the checkpoint's precision's)."""
        lat = self.latency
        frequency = np.asarray(frequency, dtype=float)
        rate = np.divide(1.0, frequency, out=np.zeros_like(frequency), where=frequency > 0)
        overhead = np.interp(rate, lat.rate, lat.overhead_ns) if lat.rate else np.zeros_like(rate)
        loading = ((kept < np.asarray(self.num_experts)) * (1.0 if loads is None else loads)).mean(axis=1)
        scale = loading / lat.sweep_loading_share if lat.sweep_loading_share else np.zeros_like(loading)
        return overhead * scale

    def misses_per_token(self, kept: np.ndarray, loads: np.ndarray | None = None) -> np.ndarray:
        """Synchronous loads per decoded token under on-demand (LRU) loading: per layer, top-k
        requests a token times the LRU miss ratio at that many slots (each counted as ``loads``
        [N, layers] loads at the checkpoint's precision)."""
        top_k = np.array([l.top_k for l in self.memory.layout.layers], dtype=float)
        curves = self.miss_curves
        rows = np.arange(len(curves))
        misses = top_k * curves[rows, np.minimum(kept, curves.shape[1] - 1)]
        return (misses * (1.0 if loads is None else loads)).sum(axis=1)

    @cached_property
    def miss_curves(self) -> np.ndarray:
        """[layers, max experts + 1]: the LRU miss ratio of each layer at each slot count."""
        width = max(self.num_experts) + 1
        return np.array([lru_miss_ratios(shares, width) for shares in self.histogram])


def lru_miss_ratios(shares: Sequence[float], width: int, grid: int = 2000) -> np.ndarray:
    """[width]: LRU miss ratio at 0 to width-1 slots for independent requests drawn from
    ``shares``, by Che's approximation: at characteristic time T an expert is resident with
    probability 1 - exp(-p_i T), so sum(1 - exp(-p_i T)) experts are, and a request misses
    with probability sum(p_i exp(-p_i T)). Both are traced over a log grid of T and the miss
    ratio read off at each whole number of slots."""
    p = np.asarray(shares, dtype=float)
    p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
    nonzero = p[p > 0]
    t = np.geomspace(1e-3 / nonzero.max(), 50.0 / nonzero.min(), grid)[:, None]
    decay = np.exp(-nonzero * t)  # [grid, experts]
    resident = np.concatenate([[0.0], (1 - decay).sum(axis=1)])
    miss = np.concatenate([[1.0], (nonzero * decay).sum(axis=1)])
    out = np.interp(np.arange(width, dtype=float), resident, miss)
    out[np.arange(width) >= len(nonzero)] = 0.0
    return out


def e_memory_many(memory: MemoryModel, kept: np.ndarray, rows: np.ndarray, precision: np.ndarray | None = None,
                  names: Sequence[str] = ("",)) -> np.ndarray:
    """E_memory of kept [N, layers] with rows [N] and precision [N, layers] (indices into ``names``;
    None: the checkpoint's): the executor's own ``plan_bytes``, given columns, its experts' bytes
    looked up per layer and precision (``expert_bytes_table``)."""
    kept, rows = np.asarray(kept, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    if precision is None or len(names) == 1:
        return np.asarray(memory.plan_bytes(kept.T, rows), dtype=np.int64)
    table = expert_bytes_table(memory.layout, names)
    per_expert = table[np.arange(kept.shape[1]), np.asarray(precision, dtype=np.int64)]  # [N, layers]
    fixed = np.asarray(memory.plan_bytes(np.zeros_like(kept).T, rows), dtype=np.int64)
    return fixed + (kept * per_expert).sum(axis=1)


def expert_bytes_table(layout, names: Sequence[str]) -> np.ndarray:
    """[layers, len(names)]: one expert's bytes in each layer at each precision (``LayerLayout.bytes_at``)."""
    return np.array([[l.bytes_at(n) for n in names] for l in layout.layers], dtype=np.int64)


def inflection_latency_ns(latency: LatencyModel, inflection_frequency: int) -> float:
    """The default latency target: E_latency of updates at the inflection point (section
    3.4.1), the most frequent updates that do not yet cost latency on this device. A plan may
    be this slow, and no slower, unless a target is given."""
    if not inflection_frequency:
        return latency.base_ns
    loading = tuple(max(1, e - 1) for e in latency.num_experts)
    return latency.inter_token_ns(Configuration(loading, inflection_frequency))
