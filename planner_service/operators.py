"""The genetic operators of the planner's search (paper section 3.4.2) on pymoo's interfaces.

Each works on genomes ``[strategy, update-frequency index, rows, experts per layer...,
precision per layer...]`` of a ``search._PlanProblem`` (``problem``), whose ``kept`` and
``precision`` slices name the genes, ``spare`` the bytes a genome leaves under the budget and
``expert_bytes`` one expert's bytes per layer at the genome's precision. Where a problem has no
precision genes, each draws exactly the random numbers it drew before there were any, so a
search without precisions finds what it found then.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling


class FullBudget(Sampling):
    """Random individuals that spend the budget: filled toward a Dirichlet share whose
    concentration is log-uniform, so allocations from skewed to nearly even all start; the
    seeds given come first."""

    def __init__(self, seeds: Sequence[np.ndarray] = ()):
        super().__init__()
        self.seeds = list(seeds)

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        random = self._random(problem, n_samples - len(self.seeds), random_state)
        return np.vstack([np.array(self.seeds, dtype=np.int64).reshape(-1, problem.n_var), random])

    def _random(self, problem, n_samples, random_state) -> np.ndarray:
        rng = random_state
        layers = problem.kept.stop - problem.kept.start
        x = np.ones((n_samples, problem.n_var), dtype=np.int64)
        for gene in range(problem.kept.start):
            x[:, gene] = rng.integers(problem.lower[gene], problem.upper[gene] + 1, n_samples)
        if problem.precision.stop > problem.precision.start:  # half at one precision throughout, half mixed
            top = len(problem.objectives.precisions)
            mixed = rng.integers(0, top, (n_samples, layers))
            x[:, problem.precision] = np.where(rng.random(n_samples)[:, None] < 0.5, mixed[:, :1], mixed)
        fit_rows(problem, x)
        concentration = 10 ** rng.uniform(-1, 1.5, n_samples)
        share = np.array([rng.dirichlet(np.full(layers, c)) for c in concentration])
        return fill_budget(problem, x, share)


def fit_rows(problem, x: np.ndarray) -> None:
    """Cut each genome's rows (in place) to what the budget holds beside one expert per layer; where
    even the fewest rows leave no room for one per layer at the genome's precision, every layer
    goes to the precision that holds an expert in the fewest bytes."""
    ones = x.copy()
    ones[:, problem.kept] = 1
    sequence = problem.objectives.memory.reserve.sequence_bytes
    over = problem.spare(ones) < 0
    if sequence and over.any():
        x[over, 2] = np.maximum(problem.lower[2], x[over, 2] + problem.spare(ones[over]) // sequence)
        ones[:, 2] = x[:, 2]
    if problem.precision.stop > problem.precision.start and (over := problem.spare(ones) < 0).any():
        x[np.ix_(over, np.arange(problem.precision.start, problem.precision.stop))] = problem.bytes_table.argmin(axis=1)


def lower_precision(problem, x: np.ndarray, chosen: np.ndarray, rng) -> None:
    """While a ``chosen`` genome [N] is over the budget, one of its layers (at random, in place)
    goes to the next precision with fewer bytes, until none can go lower."""
    codes = x[:, problem.precision]  # a view: lowering it lowers x
    top = len(problem.objectives.precisions) - 1
    while True:
        can = (codes < top) & (chosen & (problem.spare(x) < 0))[:, None]
        active = np.flatnonzero(can.any(axis=1))
        if not len(active):
            return
        weights = np.cumsum(can[active], axis=1)
        pick = (weights > rng.random(len(active))[:, None] * weights[:, -1:]).argmax(axis=1)
        codes[active, pick] += 1


def fill_budget(problem, x: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Genomes [N, genes] whose layers are grown toward ``share`` [N, layers] while each one's
    budget has room: each round, every genome adds to its layer furthest below its share."""
    x = x.copy()
    kept = x[:, problem.kept]  # a view: growing it grows x
    per_expert = problem.expert_bytes(x)  # [N, layers], at each genome's precision
    capacity = problem.upper[problem.kept]
    want = share * capacity.sum()
    rows = np.arange(len(kept))
    while True:
        spare = problem.spare(x)
        room = (kept < capacity) & (per_expert <= spare[:, None])
        growing = room.any(axis=1)
        if not growing.any():
            return x
        deficit = np.where(room, want - kept, -np.inf)
        layer = deficit.argmax(axis=1)
        steps = np.minimum(capacity[layer] - kept[rows, layer], spare // per_expert[rows, layer])
        steps = np.clip(np.minimum(steps, np.ceil(deficit[rows, layer]).clip(1, None)), 1, None)
        kept[rows[growing], layer[growing]] += steps[growing].astype(np.int64)


class ExchangeOrAverage(Crossover):
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
        kept = problem.kept
        mean = (a[~exchange, kept] + b[~exchange, kept]) / 2
        out[0][~exchange, kept] = np.floor(mean)
        out[1][~exchange, kept] = np.ceil(mean)
        return out


class ChangeOne(Mutation):
    """Change one parameter of each individual: the strategy, the update frequency, one layer's
    count (half the time by moving one expert to another layer, which keeps the memory about the
    same) or one layer's precision (half the time every layer's, to the same one)."""

    def _do(self, problem, x, *args, random_state=None, **kwargs):
        rng = random_state
        x = np.asarray(x, dtype=np.int64).copy()
        rows = np.arange(len(x))
        gene = rng.integers(0, problem.n_var, len(x))
        other = rng.integers(problem.kept.start, problem.kept.stop, len(x))
        move = (gene >= problem.kept.start) & (gene < problem.kept.stop) & (rng.random(len(x)) < 0.5)
        redraw = ~move
        x[rows[redraw], gene[redraw]] = rng.integers(problem.lower[gene], problem.upper[gene] + 1)[redraw]
        can = move & (gene != other) & (x[rows, gene] > 1) & (x[rows, other] < problem.upper[other])
        x[rows[can], gene[can]] -= 1
        x[rows[can], other[can]] += 1
        if problem.precision.stop > problem.precision.start:
            every = (gene >= problem.precision.start) & (rng.random(len(x)) < 0.5)
            x[np.ix_(every, np.arange(problem.precision.start, problem.precision.stop))] = x[every, gene[every]][:, None]
        return x


class FitBudget(Repair):
    """Every individual is brought within the budget: rows first, when one expert per layer does
    not fit beside them, then experts taken away from random layers (weighted by their counts);
    then half of them, at random, fill the room left. The other half keep it: a model may rank a
    plan that leaves memory unused above those that spend it."""

    def _do(self, problem, x, random_state=None, **kwargs):
        rng = random_state or np.random.default_rng(0)
        x = np.asarray(x, dtype=np.int64).copy()
        fit_rows(problem, x)
        kept = x[:, problem.kept]  # a view: cutting it cuts x
        if problem.precision.stop > problem.precision.start:  # half lower the precision first
            lower_precision(problem, x, rng.random(len(x)) < 0.5, rng)
        over = problem.spare(x) < 0
        if over.any():  # most of the way in one step: each layer gives up the same share of its extra experts
            removable = ((kept[over] - 1) * problem.expert_bytes(x[over])).sum(axis=1)
            share = -problem.spare(x[over]) / np.maximum(removable, 1)
            kept[over] -= np.floor((kept[over] - 1) * share[:, None] * 0.98).astype(np.int64)
        while (over := problem.spare(x) < 0).any():
            weights = np.cumsum(kept[over] - 1, axis=1)
            pick = (weights > rng.random(len(weights))[:, None] * weights[:, -1:]).argmax(axis=1)
            kept[np.flatnonzero(over), pick] -= 1
        fill = rng.random(len(x)) < 0.5
        x[fill] = fill_budget(problem, x[fill], rng.dirichlet(np.ones(kept.shape[1]), int(fill.sum())))
        return x
