"""Random virtual-expert configurations for accuracy profiling (paper section 3.4.2).

A configuration is ``{update_frequency, experts_per_layer}``. Configuration ``i`` of a seed
is drawn from its own generator (seed, i), so a run is deterministic and a longer run is a
superset of a shorter one. How one is drawn, so the models see skewed and even allocations
across the range of budgets:

1. the total number of resident experts, uniform between one per layer and all of them;
2. the share of each layer from a symmetric Dirichlet whose concentration is log-uniform
   between 0.1 (most experts in a few layers) and 30 (close to even); every eighth
   configuration is the exact even split of its total, the planner's default;
3. the update frequency, uniform over ``UPDATE_FREQUENCIES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from swapmoe.core.plan import Plan

UPDATE_FREQUENCIES = (2, 4, 8, 16, 32)
EVEN_EVERY = 8


@dataclass(frozen=True, slots=True)
class Configuration:
    experts_per_layer: tuple[int, ...]
    update_frequency: int

    @property
    def key(self) -> str:
        """A readable identity: equal configurations share it, whatever drew them."""
        return f"f={self.update_frequency};k={','.join(map(str, self.experts_per_layer))}"

    @classmethod
    def from_key(cls, key: str) -> "Configuration":
        f, k = key.split(";")
        return cls(tuple(int(x) for x in k[2:].split(",")), int(f[2:]))

    def plan(self, version: int = 1, origin: str = "profiling") -> Plan:
        return Plan(version, self.experts_per_layer, self.update_frequency, origin=origin)


def allocate(total: int, shares: Sequence[float], capacity: Sequence[int]) -> tuple[int, ...]:
    """``total`` experts over layers in proportion to ``shares``: each layer keeps 1 to its
    ``capacity``; what a full layer cannot take goes to the others, rounding by largest remainder."""
    capacity = np.asarray(capacity)
    if not len(capacity) <= total <= capacity.sum():
        raise ValueError(f"total {total} is outside 1 per layer ({len(capacity)}) to all ({capacity.sum()})")
    counts = np.ones(len(capacity), dtype=int)
    shares = np.asarray(shares, dtype=float) + 1e-12
    while (left := total - counts.sum()) > 0:
        open_ = counts < capacity
        want = np.where(open_, shares, 0.0)
        ideal = np.minimum(counts + left * want / want.sum(), capacity)
        whole = np.floor(ideal).astype(int)
        if whole.sum() == counts.sum():  # under one expert per layer to give: largest remainder
            order = np.argsort(-(ideal - whole) - open_ * 1e-9, kind="stable")
            for i in order[:left]:
                if counts[i] < capacity[i]:
                    counts[i] += 1
            continue
        counts = np.maximum(counts, whole)
    return tuple(int(c) for c in counts)


def sample(num_experts: Sequence[int], index: int, seed: int = 0) -> Configuration:
    """Configuration ``index`` of ``seed`` for layers of ``num_experts`` experts."""
    rng = np.random.default_rng([seed, index])
    layers = len(num_experts)
    total = int(rng.integers(layers, sum(num_experts) + 1))
    if index % EVEN_EVERY == 0:
        shares = np.ones(layers)
    else:
        shares = rng.dirichlet(np.full(layers, 10 ** rng.uniform(-1, np.log10(30))))
    frequency = int(rng.choice(UPDATE_FREQUENCIES))
    return Configuration(allocate(total, shares, num_experts), frequency)


def sample_many(num_experts: Sequence[int], count: int, seed: int = 0,
                keep: Callable[[Configuration], bool] = lambda config: True) -> list[Configuration]:
    """The first ``count`` distinct configurations of ``seed`` that ``keep`` accepts, in order: a
    filtered run is still deterministic, and a longer one a superset of a shorter one."""
    out, seen, index = [], set(), 0
    while len(out) < count:
        config = sample(num_experts, index, seed)
        index += 1
        if config.key not in seen and keep(config):
            seen.add(config.key)
            out.append(config)
        if index > 100 * count + 1000:
            break  # a tiny model (or a tight filter) has fewer distinct configurations than asked for
    return out
