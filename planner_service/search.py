"""The genetic search for a plan (paper section 3.4.2), on pymoo's NSGA-II.

A genome is ``[strategy, update-frequency index, experts of layer 0, ..., of layer L-1]``.
Following the paper: a random initial population (each individual spends the whole budget,
spread by a random Dirichlet share, so skewed and even allocations both start); mutation
changes one parameter (or moves one expert between two layers); crossover exchanges genes or
averages them; configurations over the memory budget are repaired back under it, and NSGA-II
drops dominated ones. The two objectives are the loss E_accuracy predicts and the inter-token
latency E_latency predicts; memory and the latency target are constraints.

The answer is the most accurate plan whose predicted latency meets the target (ties: the faster);
when none does, the fastest plan that fits. Every evaluated individual is considered, not
only the last front. pymoo was chosen over a hand-written loop for its constrained
non-dominated sorting, elitism and seeded generators; the operators are the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling
from pymoo.optimize import minimize

from swapmoe.core.plan import Plan, Strategy
from swapmoe.planner_service.objectives import Objectives, Prediction

HEAD = 2  # genes before the layers: strategy, frequency index


@dataclass(frozen=True, slots=True)
class SearchSettings:
    population: int = 48
    generations: int = 60
    seed: int = 0
    # A space of at most this many configurations is enumerated instead: exact, and faster
    # than a population that soon holds every configuration there is.
    enumerate_below: int = 20_000

    def __post_init__(self):
        if self.population < 4 or self.generations < 1:
            raise ValueError("population must be at least 4 and generations at least 1")


@dataclass(frozen=True, slots=True)
class Found:
    """A searched plan and what the models predict for it."""

    strategy: Strategy
    update_frequency: int
    experts_per_layer: tuple[int, ...]
    predicted: Prediction
    budget_bytes: int
    workload: str
    meets_latency: bool  # False: no plan met the latency target; this is the fastest that fits
    evaluated: int  # configurations the search evaluated

    def plan(self, version: int, origin: str) -> Plan:
        return Plan(version, self.experts_per_layer, self.update_frequency, self.strategy, origin)

    def to_json(self) -> dict:
        return dict(strategy=self.strategy.value, update_frequency=self.update_frequency,
                    experts_per_layer=list(self.experts_per_layer), budget_bytes=self.budget_bytes,
                    workload=self.workload, meets_latency=self.meets_latency, evaluated=self.evaluated,
                    accuracy=self.predicted.accuracy, inter_token_ns=self.predicted.inter_token_ns,
                    memory_bytes=self.predicted.memory_bytes)

    @classmethod
    def from_json(cls, body: dict) -> "Found":
        return cls(Strategy(body["strategy"]), int(body["update_frequency"]),
                   tuple(int(k) for k in body["experts_per_layer"]),
                   Prediction(float(body["accuracy"]), float(body["inter_token_ns"]), int(body["memory_bytes"])),
                   int(body["budget_bytes"]), str(body["workload"]), bool(body["meets_latency"]),
                   int(body["evaluated"]))


def search(objectives: Objectives, budget_bytes: int, latency_target_ns: float | None = None,
           settings: SearchSettings = SearchSettings(), seeds: Sequence[Found] = ()) -> Found:
    """The best plan for ``budget_bytes`` (and ``latency_target_ns``, when given). ``seeds``
    (plans found for nearby budgets) join the random initial population, repaired to fit."""
    if (least := objectives.memory.smallest_plan_bytes) > budget_bytes:
        raise ValueError(f"budget {budget_bytes} is below the smallest plan's {least} (one expert per layer and a "
                         f"full batch)")
    problem = _PlanProblem(objectives, budget_bytes, math.inf if latency_target_ns is None else latency_target_ns)
    if problem.size <= settings.enumerate_below:
        return exhaustive(objectives, budget_bytes, latency_target_ns)
    start = [problem.genome(f) for f in seeds][: settings.population // 2]
    algorithm = NSGA2(pop_size=settings.population, sampling=_FullBudget(start), crossover=_ExchangeOrAverage(),
                      mutation=_ChangeOne(), repair=_FitBudget(), eliminate_duplicates=True)
    minimize(problem, algorithm, ("n_gen", settings.generations), seed=settings.seed, verbose=False)
    return problem.best()


def exhaustive(objectives: Objectives, budget_bytes: int, latency_target_ns: float | None = None,
               chunk: int = 1 << 16) -> Found:
    """The optimum ``search`` looks for, by evaluating every configuration (small spaces only:
    tests and benchmarks measure the search against it)."""
    problem = _PlanProblem(objectives, budget_bytes, math.inf if latency_target_ns is None else latency_target_ns)
    sizes = problem.upper - problem.lower + 1
    total = int(np.prod(sizes.astype(float)))
    if total > 50_000_000:
        raise ValueError(f"{total} configurations are too many to enumerate")
    for start in range(0, total, chunk):
        index = np.arange(start, min(total, start + chunk))
        genomes = np.stack(np.unravel_index(index, sizes), axis=1) + problem.lower
        genomes = genomes[problem.spare(genomes[:, HEAD:]) >= 0]
        if len(genomes):
            problem.evaluate(genomes, return_as_dictionary=True)
            problem.keep_best()
    return problem.best()


class _PlanProblem(Problem):
    def __init__(self, objectives: Objectives, budget: int, latency_target: float):
        num_experts = np.array(objectives.num_experts)
        super().__init__(n_var=HEAD + len(num_experts), n_obj=2, n_ieq_constr=2, vtype=int,
                         xl=np.array([0, 0] + [1] * len(num_experts)),
                         xu=np.concatenate([[len(objectives.strategies) - 1, len(objectives.update_frequencies) - 1],
                                            num_experts]))
        self.objectives, self.budget, self.latency_target = objectives, budget, latency_target
        self.lower, self.upper = self.xl.astype(np.int64), self.xu.astype(np.int64)  # pymoo keeps floats
        self.frequencies = np.array(objectives.update_frequencies)
        self.bytes_per_expert = np.array([l.bytes_per_expert for l in objectives.memory.layout.layers])
        self.fixed = objectives.memory.fixed_bytes
        self.archive: list[tuple[np.ndarray, ...]] = []  # (genomes, loss, latency, bytes) per evaluation
        self.evaluated = 0  # genomes forgotten by keep_best

    def _evaluate(self, x, out, *args, **kwargs):
        x = np.asarray(x, dtype=np.int64)
        accuracy, latency, memory = self.objectives.predict(x[:, 0], self.frequencies[x[:, 1]], x[:, HEAD:])
        loss = self.objectives.loss(accuracy)
        out["F"] = np.column_stack([loss, latency])
        out["G"] = np.column_stack([memory - self.budget, latency - min(self.latency_target, 1e30)])
        self.archive.append((x, loss, latency, memory))

    def keep_best(self) -> None:
        """Forget all but the rows ``best`` could pick (an enumeration keeps little memory)."""
        x, loss, latency, memory = (np.concatenate(parts) for parts in zip(*self.archive))
        rows = [r for r in (self._pick(x, loss, latency, memory, timely=True),
                            self._pick(x, loss, latency, memory, timely=False)) if r is not None]
        self.evaluated += len(x) - len(rows)
        self.archive = [(x[rows], loss[rows], latency[rows], memory[rows])]

    def _pick(self, x, loss, latency, memory, timely: bool) -> int | None:
        """The most accurate plan that fits and meets the latency target (ties: faster, then the
        smaller genome), or with ``timely`` False the fastest plan that fits."""
        ok = (memory <= self.budget) & ((latency <= self.latency_target) if timely else True)
        rows = np.flatnonzero(ok)
        if not len(rows):
            return None
        primary, secondary = (loss, latency) if timely else (latency, loss)
        keys = [x[rows, i] for i in reversed(range(x.shape[1]))] + [secondary[rows], primary[rows]]
        return int(rows[np.lexsort(keys)[0]])

    def best(self) -> Found:
        x, loss, latency, memory = (np.concatenate(parts) for parts in zip(*self.archive))
        row = self._pick(x, loss, latency, memory, timely=True)
        timely = row is not None
        row = row if timely else self._pick(x, loss, latency, memory, timely=False)
        assert row is not None, "the repair keeps every individual within the budget"
        genome = x[row]
        strategy = self.objectives.strategies[genome[0]]
        # On-demand never updates in the background: its frequency means nothing, so it is 0.
        frequency = 0 if strategy is Strategy.ON_DEMAND else int(self.frequencies[genome[1]])
        kept = tuple(int(k) for k in genome[HEAD:])
        evaluated = self.evaluated + len(np.unique(x, axis=0))
        return Found(strategy, frequency, kept, self.objectives.predict_one(strategy, frequency, kept), self.budget,
                     self.objectives.workload, timely, evaluated)

    @property
    def size(self) -> int:
        """Configurations in the space, within the budget or not."""
        return math.prod(int(s) for s in self.upper - self.lower + 1)

    def genome(self, found: Found) -> np.ndarray:
        strategy = self.objectives.strategies.index(found.strategy) if found.strategy in self.objectives.strategies else 0
        frequencies = list(self.frequencies)
        frequency = frequencies.index(found.update_frequency) if found.update_frequency in frequencies else 0
        return np.array([strategy, frequency, *found.experts_per_layer], dtype=np.int64)

    def spare(self, kept: np.ndarray) -> np.ndarray:
        """Bytes left under the budget per individual (negative: over)."""
        return self.budget - (self.fixed + kept @ self.bytes_per_expert)


class _FullBudget(Sampling):
    """Random individuals that spend the budget: filled toward a Dirichlet share whose
    concentration is log-uniform, so allocations from skewed to nearly even all start; the
    seeds given come first."""

    def __init__(self, seeds: Sequence[np.ndarray] = ()):
        super().__init__()
        self.seeds = list(seeds)

    def _do(self, problem: _PlanProblem, n_samples, *args, random_state=None, **kwargs):
        random = self._random(problem, n_samples - len(self.seeds), random_state)
        return np.vstack([np.array(self.seeds, dtype=np.int64).reshape(-1, problem.n_var), random])

    def _random(self, problem: _PlanProblem, n_samples, random_state) -> np.ndarray:
        rng = random_state
        layers = problem.n_var - HEAD
        x = np.ones((n_samples, problem.n_var), dtype=np.int64)
        x[:, 0] = rng.integers(0, problem.upper[0] + 1, n_samples)
        x[:, 1] = rng.integers(0, problem.upper[1] + 1, n_samples)
        concentration = 10 ** rng.uniform(-1, 1.5, n_samples)
        share = np.array([rng.dirichlet(np.full(layers, c)) for c in concentration])
        x[:, HEAD:] = _fill(problem, x[:, HEAD:], share)
        return x


def _fill(problem: _PlanProblem, kept: np.ndarray, share: np.ndarray) -> np.ndarray:
    """kept [N, layers] grown toward ``share`` [N, layers] while each row's budget has room:
    each round, every row adds to its layer furthest below its share."""
    kept = kept.copy()
    capacity = problem.upper[HEAD:]
    want = share * capacity.sum()
    rows = np.arange(len(kept))
    while True:
        spare = problem.spare(kept)
        room = (kept < capacity) & (problem.bytes_per_expert <= spare[:, None])
        growing = room.any(axis=1)
        if not growing.any():
            return kept
        deficit = np.where(room, want - kept, -np.inf)
        layer = deficit.argmax(axis=1)
        steps = np.minimum(capacity[layer] - kept[rows, layer], spare // problem.bytes_per_expert[layer])
        steps = np.clip(np.minimum(steps, np.ceil(deficit[rows, layer]).clip(1, None)), 1, None)
        kept[rows[growing], layer[growing]] += steps[growing].astype(np.int64)


class _ExchangeOrAverage(Crossover):
    """Two parents give two children: half the matings exchange genes uniformly, half average
    the layers' counts (rounded down for one child, up for the other)."""

    def __init__(self):
        super().__init__(2, 2, prob=0.9)

    def _do(self, problem, x, *args, random_state=None, **kwargs):
        rng = random_state
        a, b = x[0].astype(np.int64), x[1].astype(np.int64)
        out = np.stack([a.copy(), b.copy()])
        exchange = rng.random(len(a)) < 0.5
        swap = (rng.random(a.shape) < 0.5) & exchange[:, None]
        out[0][swap], out[1][swap] = b[swap], a[swap]
        mean = (a[~exchange, HEAD:] + b[~exchange, HEAD:]) / 2
        out[0][~exchange, HEAD:] = np.floor(mean)
        out[1][~exchange, HEAD:] = np.ceil(mean)
        return out


class _ChangeOne(Mutation):
    """Change one parameter of each individual: the strategy, the update frequency, or one
    layer's count (half the time by moving one expert to another layer, which keeps the
    memory about the same)."""

    def _do(self, problem, x, *args, random_state=None, **kwargs):
        rng = random_state
        x = np.asarray(x, dtype=np.int64).copy()
        rows = np.arange(len(x))
        gene = rng.integers(0, problem.n_var, len(x))
        other = rng.integers(HEAD, problem.n_var, len(x))
        move = (gene >= HEAD) & (rng.random(len(x)) < 0.5)
        redraw = ~move
        x[rows[redraw], gene[redraw]] = rng.integers(problem.lower[gene], problem.upper[gene] + 1)[redraw]
        can = move & (gene != other) & (x[rows, gene] > 1) & (x[rows, other] < problem.upper[other])
        x[rows[can], gene[can]] -= 1
        x[rows[can], other[can]] += 1
        return x


class _FitBudget(Repair):
    """Every individual is brought within the budget by taking experts away from random layers
    (weighted by their counts); then half of them, at random, fill the room left. The other
    half keep it: a model may rank a plan that leaves memory unused above those that spend it."""

    def _do(self, problem: _PlanProblem, x, random_state=None, **kwargs):
        rng = random_state or np.random.default_rng(0)
        x = np.asarray(x, dtype=np.int64).copy()
        kept = x[:, HEAD:]
        over = problem.spare(kept) < 0
        if over.any():  # most of the way in one step: each layer gives up the same share of its extra experts
            removable = (kept[over] - 1) @ problem.bytes_per_expert
            share = -problem.spare(kept[over]) / np.maximum(removable, 1)
            kept[over] -= np.floor((kept[over] - 1) * share[:, None] * 0.98).astype(np.int64)
        while (over := problem.spare(kept) < 0).any():
            weights = np.cumsum(kept[over] - 1, axis=1)
            pick = (weights > rng.random(len(weights))[:, None] * weights[:, -1:]).argmax(axis=1)
            kept[np.flatnonzero(over), pick] -= 1
        fill = rng.random(len(kept)) < 0.5
        kept[fill] = _fill(problem, kept[fill], rng.dirichlet(np.ones(kept.shape[1]), int(fill.sum())))
        x[:, HEAD:] = kept
        return x
