"""The genetic search for a plan (paper section 3.4.2), on pymoo's NSGA-II.

A genome is ``[strategy, update-frequency index, rows, experts of layer 0, ..., of layer L-1]``,
then, where the executor keeps experts at lower precisions that E_accuracy was profiled with,
``[precision of layer 0, ..., of layer L-1]`` (indices into ``Objectives.precisions``, most bytes
first). Following the paper: a random initial population (each individual spends the whole
budget, spread by a random Dirichlet share, so skewed and even allocations both start, at
random precisions); mutation changes one parameter (or moves one expert between two layers, or
sets every layer's precision at once); crossover exchanges genes or averages the counts;
configurations over the memory budget are repaired back under it (rows first when one expert
per layer does not fit beside them; then half of them lower the precision of random layers
before any expert goes, half give up experts alone, so a budget cut is answered by whichever
the models predict loses less), and NSGA-II drops dominated ones. The two
objectives are the loss E_accuracy predicts and the inter-token latency per stream E_latency
predicts at the service's offered load; memory, the latency target and the throughput target are
constraints.

The answer is the most accurate plan that meets the targets (ties: the faster); when none does,
the targets are loosened by steps of 25% until one does (a budget too small for the rows a load
asks for gets the most accurate plan near the fastest, not the fastest at any cost). Every
evaluated individual is considered, not only the last front. pymoo was chosen over a hand-written loop for its constrained
non-dominated sorting, elitism and seeded generators; the operators are the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.optimize import minimize

from swapmoe.core.plan import Plan, Strategy
from swapmoe.core.sizes import format_size
from swapmoe.planner_service.objectives import Objectives, Prediction, Service, expert_bytes_table
from swapmoe.planner_service.operators import ChangeOne, ExchangeOrAverage, FitBudget, FullBudget

HEAD = 3  # genes before the layers: strategy, frequency index, rows


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
    meets_latency: bool  # False: no plan met the targets; this is the most accurate within them loosened
    evaluated: int  # configurations the search evaluated
    rows: int = 0  # sequences decoded together (0: the executor's full batch)
    offered_load: int = 1  # concurrent streams it was chosen for
    verified: str = ""  # what was measured before it was chosen ("": not verified; planner_service.verification)
    precision: tuple[str, ...] = ()  # per layer ("": the checkpoint's); empty: the checkpoint's everywhere

    def plan(self, version: int, origin: str) -> Plan:
        return Plan(version, self.experts_per_layer, self.update_frequency, self.strategy, origin, rows=self.rows,
                    precision=self.precision)

    def origin(self, budget_bytes: int) -> str:
        """A plan's origin: what it was searched for, and what the models predict of it."""
        rows = f" rows={self.rows} load={self.offered_load}" if self.rows else ""
        counts = {p or "native": self.precision.count(p) for p in self.precision}  # layers at each: short for any model
        precision = f" precision={','.join(f'{p}x{n}' for p, n in counts.items())}" if self.precision else ""
        return (f"planner:search workload={self.workload} budget={format_size(budget_bytes)}{rows} "
                f"strategy={self.strategy.value}{precision} predicted={self.predicted.accuracy:.4g} "
                f"{self.predicted.inter_token_ns / 1e6:.2f}ms"
                + (" verified" if self.verified.startswith("measured") else ""))

    def to_json(self) -> dict:
        return dict(strategy=self.strategy.value, update_frequency=self.update_frequency,
                    experts_per_layer=list(self.experts_per_layer), budget_bytes=self.budget_bytes,
                    workload=self.workload, meets_latency=self.meets_latency, evaluated=self.evaluated,
                    accuracy=self.predicted.accuracy, inter_token_ns=self.predicted.inter_token_ns,
                    memory_bytes=self.predicted.memory_bytes, throughput=self.predicted.throughput,
                    rows=self.rows, offered_load=self.offered_load, verified=self.verified,
                    **({"precision": list(self.precision)} if self.precision else {}))

    @classmethod
    def from_json(cls, body: dict) -> "Found":
        return cls(Strategy(body["strategy"]), int(body["update_frequency"]),
                   tuple(int(k) for k in body["experts_per_layer"]),
                   Prediction(float(body["accuracy"]), float(body["inter_token_ns"]), int(body["memory_bytes"]),
                              float(body.get("throughput", 0.0))),
                   int(body["budget_bytes"]), str(body["workload"]), bool(body["meets_latency"]),
                   int(body["evaluated"]), int(body.get("rows", 0)), int(body.get("offered_load", 1)),
                   str(body.get("verified", "")), tuple(str(p) for p in body.get("precision", ())))


def search(objectives: Objectives, budget_bytes: int, service: Service = Service(),
           settings: SearchSettings = SearchSettings(), seeds: Sequence[Found] = ()) -> Found:
    """The best plan for ``budget_bytes`` and ``service`` (its latency target None: no target).
    ``seeds`` (plans found for nearby budgets) join the random initial population, repaired to fit."""
    return candidates(objectives, budget_bytes, service, settings, seeds, 1)[0]


def candidates(objectives: Objectives, budget_bytes: int, service: Service = Service(),
               settings: SearchSettings = SearchSettings(), seeds: Sequence[Found] = (), count: int = 3) -> list[Found]:
    """``search``'s answer and the next most accurate distinct plans that meet the targets, up to
    ``count`` in all, best first (just the fastest plan that fits when none meets them)."""
    if (least := least_bytes(objectives)) > budget_bytes:
        raise ValueError(f"budget {budget_bytes} is below the smallest plan's {least} (one expert per layer and "
                         f"one sequence)")
    problem = _PlanProblem(objectives, budget_bytes, service)
    if problem.size <= settings.enumerate_below:
        return _enumerate(problem, count)
    start = [problem.genome(f) for f in seeds][: settings.population // 2]
    algorithm = NSGA2(pop_size=settings.population, sampling=FullBudget(start), crossover=ExchangeOrAverage(),
                      mutation=ChangeOne(), repair=FitBudget(), eliminate_duplicates=True)
    minimize(problem, algorithm, ("n_gen", settings.generations), seed=settings.seed, verbose=False)
    return problem.ranked(count)


def exhaustive(objectives: Objectives, budget_bytes: int, service: Service = Service()) -> Found:
    """The optimum ``search`` looks for, by evaluating every configuration (small spaces only:
    tests and benchmarks measure the search against it)."""
    return _enumerate(_PlanProblem(objectives, budget_bytes, service), 1)[0]


def _enumerate(problem: "_PlanProblem", count: int, chunk: int = 1 << 16) -> list[Found]:
    sizes = problem.upper - problem.lower + 1
    total = int(np.prod(sizes.astype(float)))
    if total > 50_000_000:
        raise ValueError(f"{total} configurations are too many to enumerate")
    for start in range(0, total, chunk):
        index = np.arange(start, min(total, start + chunk))
        genomes = np.stack(np.unravel_index(index, sizes), axis=1) + problem.lower
        genomes = genomes[problem.spare(genomes) >= 0]
        if len(genomes):
            problem.evaluate(genomes, return_as_dictionary=True)
            problem.keep_best(count)
    return problem.ranked(count)


def least_bytes(objectives: Objectives) -> int:
    """One expert per layer at the smallest precision searched and one sequence (or, from an
    executor that does not say its sequence bytes, its full batch): the executor's own minimum
    counts precisions the accuracy model may not know."""
    memory, layers = objectives.memory, objectives.memory.layout.layers
    smallest = [min(objectives.precisions, key=l.bytes_at) for l in layers]
    return memory.plan_bytes([1] * len(layers), 1 if memory.reserve.sequence_bytes else 0, smallest)


class _PlanProblem(Problem):
    def __init__(self, objectives: Objectives, budget: int, service: Service):
        num_experts = np.array(objectives.num_experts)
        reserve = objectives.memory.reserve
        rows = (1, reserve.max_rows) if reserve.sequence_bytes else (0, 0)  # (0, 0): the full batch, unsized
        layers, names = len(num_experts), objectives.precisions
        precision = len(names) > 1  # precision genes only where there is a choice
        super().__init__(n_var=HEAD + layers * (1 + precision), n_obj=2, n_ieq_constr=3, vtype=int,
                         xl=np.array([0, 0, rows[0]] + [1] * layers + [0] * (layers * precision)),
                         xu=np.concatenate([[len(objectives.strategies) - 1, len(objectives.update_frequencies) - 1,
                                             rows[1]], num_experts, [len(names) - 1] * (layers * precision)]))
        self.kept = slice(HEAD, HEAD + layers)  # genes of the experts per layer, then of their precision
        self.precision = slice(HEAD + layers, HEAD + layers * (1 + precision))
        self.bytes_table = expert_bytes_table(objectives.memory.layout, names)  # [layers, precisions]
        self.objectives, self.budget, self.service = objectives, budget, service
        self.latency_target = math.inf if service.latency_target_ns is None else service.latency_target_ns
        self.lower, self.upper = self.xl.astype(np.int64), self.xu.astype(np.int64)  # pymoo keeps floats
        self.frequencies = np.array(objectives.update_frequencies)
        self.archive: list[tuple[np.ndarray, ...]] = []  # (genomes, loss, latency, bytes, throughput) per evaluation
        self.evaluated = 0  # genomes forgotten by keep_best

    def _evaluate(self, x, out, *args, **kwargs):
        x = np.asarray(x, dtype=np.int64)
        accuracy, latency, memory, throughput = self.objectives.predict(
            x[:, 0], self.frequencies[x[:, 1]], x[:, 2], x[:, self.kept], self.service.offered_load, self.codes(x))
        loss = self.objectives.loss(accuracy)
        out["F"] = np.column_stack([loss, latency])
        out["G"] = np.column_stack([memory - self.budget, latency - min(self.latency_target, 1e30),
                                    self.service.throughput_target - throughput])
        self.archive.append((x, loss, latency, memory, throughput))

    def keep_best(self, count: int = 1) -> None:
        """Forget all but the rows ``ranked(count)`` could pick (an enumeration keeps little memory)."""
        parts = [np.concatenate(p) for p in zip(*self.archive)]
        rows = self._order(*parts, timely=True, count=count) or self._order(*parts, timely=True, count=count,
                                                                             relax=self._relaxation(*parts))
        self.evaluated += len(parts[0]) - len(rows)
        self.archive = [tuple(p[rows] for p in parts)]

    def _order(self, x, loss, latency, memory, throughput, timely: bool, count: int, relax: float = 1.0) -> list[int]:
        """Up to ``count`` rows of distinct plans, best first: the most accurate that fit and meet the
        targets (``relax`` times looser; ties: faster, then the smaller genome), or with ``timely``
        False the fastest that fit."""
        meets = (latency <= self.latency_target * relax) & (throughput >= self.service.throughput_target / relax)
        rows = np.flatnonzero((memory <= self.budget) & (meets if timely else True))
        primary, secondary = (loss, latency) if timely else (latency, loss)
        keys = [x[rows, i] for i in reversed(range(x.shape[1]))] + [secondary[rows], primary[rows]]
        out, seen = [], set()
        for row in rows[np.lexsort(keys)] if len(rows) else ():
            plan = self._plan(x[row])
            if plan not in seen:
                seen.add(plan)
                out.append(int(row))
                if len(out) == count:
                    break
        return out

    def _plan(self, genome: np.ndarray) -> tuple:
        """(strategy, update frequency, rows, experts, precision) of a genome. On-demand never updates
        in the background: its frequency means nothing, so it is 0."""
        strategy = self.objectives.strategies[genome[0]]
        frequency = 0 if strategy is Strategy.ON_DEMAND else int(self.frequencies[genome[1]])
        precision = tuple(self.objectives.precisions[c] for c in genome[self.precision])
        return (strategy, frequency, int(genome[2]), tuple(int(k) for k in genome[self.kept]),
                precision if any(precision) else ())

    def codes(self, x: np.ndarray) -> np.ndarray:
        """[N, layers]: each genome's precision per layer (the checkpoint's where it has no such genes)."""
        return x[:, self.precision] if self.precision.stop > self.precision.start else np.zeros_like(x[:, self.kept])

    def expert_bytes(self, x: np.ndarray) -> np.ndarray:
        """[N, layers]: one expert's bytes in each layer of each genome, at its precision."""
        return self.bytes_table[np.arange(self.bytes_table.shape[0]), self.codes(x)]

    def _relaxation(self, x, loss, latency, memory, throughput) -> float:
        """When no plan that fits meets the targets: the least of 1.25, 1.25^2, ... by which they are
        loosened until one does, so the plan chosen is the most accurate near the fastest, not the
        fastest at any cost in accuracy (a budget too small for the rows a load asks for)."""
        fits = memory <= self.budget
        need = np.maximum(latency[fits] / self.latency_target,
                          np.divide(self.service.throughput_target, throughput[fits],
                                    out=np.full(int(fits.sum()), np.inf), where=throughput[fits] > 0)
                          if self.service.throughput_target else 0.0)
        least = float(need.min()) if len(need) else 1.0
        return 1.25 ** math.ceil(math.log(least) / math.log(1.25)) if 1.0 < least < math.inf else 1.0

    def ranked(self, count: int) -> list[Found]:
        parts = [np.concatenate(p) for p in zip(*self.archive)]
        rows = self._order(*parts, timely=True, count=count)
        timely = bool(rows)
        rows = rows or self._order(*parts, timely=True, count=count, relax=self._relaxation(*parts)) \
            or self._order(*parts, timely=False, count=1)
        assert rows, "the repair keeps every individual within the budget"
        evaluated, load = self.evaluated + len(np.unique(parts[0], axis=0)), self.service.offered_load
        out = []
        for row in rows:
            strategy, frequency, rows_run, kept, precision = self._plan(parts[0][row])
            predicted = self.objectives.predict_one(strategy, frequency, kept, rows_run, load, precision)
            out.append(Found(strategy, frequency, kept, predicted, self.budget, self.objectives.workload, timely,
                             evaluated, rows_run, load, precision=precision))
        return out

    @property
    def size(self) -> int:
        """Configurations in the space, within the budget or not."""
        return math.prod(int(s) for s in self.upper - self.lower + 1)

    def genome(self, found: Found) -> np.ndarray:
        strategy = self.objectives.strategies.index(found.strategy) if found.strategy in self.objectives.strategies else 0
        frequencies = list(self.frequencies)
        frequency = frequencies.index(found.update_frequency) if found.update_frequency in frequencies else 0
        rows = int(np.clip(found.rows, self.lower[2], self.upper[2]))
        names = self.objectives.precisions
        genes = [names.index(p) if p in names else 0 for p in found.precision or ("",) * len(found.experts_per_layer)]
        genes = genes if self.precision.stop > self.precision.start else []
        return np.array([strategy, frequency, rows, *found.experts_per_layer, *genes], dtype=np.int64)

    def spare(self, x: np.ndarray) -> np.ndarray:
        """Bytes left under the budget per individual (whole genomes; negative: over)."""
        memory = self.objectives.memory
        fixed = memory.plan_bytes([0] * memory.layout.num_layers, x[:, 2])
        return self.budget - (fixed + (x[:, self.kept] * self.expert_bytes(x)).sum(axis=1))
