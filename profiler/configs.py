"""Random virtual-expert configurations for accuracy profiling (paper section 3.4.2).

A configuration is ``{update_frequency, experts_per_layer, precision}``. Configuration ``i`` of
a seed is drawn from its own generator (seed, i), so a run is deterministic and a longer run is
a superset of a shorter one. How one is drawn, so the models see skewed and even allocations
across the range of budgets:

1. the total number of resident experts, uniform between one per layer and all of them;
2. the share of each layer from a symmetric Dirichlet whose concentration is log-uniform
   between 0.1 (most experts in a few layers) and 30 (close to even); every eighth
   configuration is the exact even split of its total, the planner's default;
3. the update frequency, uniform over ``UPDATE_FREQUENCIES``;
4. where the store keeps experts at lower precisions (``executor.quantization``), the precision
   of each layer's experts: the checkpoint's everywhere (``NATIVE_SHARE`` of them), one lower
   precision everywhere (``UNIFORM_SHARE``, each equally likely), else each layer's drawn on its
   own among the checkpoint's and the lower ones. Drawn last, so steps 1-3 are those of a run
   without precisions: its scores stay valid where the precision comes out the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from swapmoe.core.plan import Plan

UPDATE_FREQUENCIES = (2, 4, 8, 16, 32)
EVEN_EVERY = 8
NATIVE_SHARE, UNIFORM_SHARE = 0.35, 0.25  # of configurations, where lower precisions are kept; the rest mixed


@dataclass(frozen=True, slots=True)
class Configuration:
    experts_per_layer: tuple[int, ...]
    update_frequency: int
    # Per layer ("": the checkpoint's); empty: the checkpoint's everywhere (stored that way when it is).
    precision: tuple[str, ...] = ()

    def __post_init__(self):
        if not any(self.precision):
            object.__setattr__(self, "precision", ())

    @property
    def precisions(self) -> tuple[str, ...]:
        """``precision`` with one entry per layer."""
        return self.precision or ("",) * len(self.experts_per_layer)

    @property
    def key(self) -> str:
        """A readable identity: equal configurations share it, whatever drew them. The precision
        part is there only when some layer is not at the checkpoint's (so older keys read the same)."""
        key = f"f={self.update_frequency};k={','.join(map(str, self.experts_per_layer))}"
        return key + (f";p={','.join(self.precision)}" if self.precision else "")

    @classmethod
    def from_key(cls, key: str) -> "Configuration":
        f, k, *p = key.split(";")
        precision = tuple(p[0][2:].split(",")) if p else ()
        return cls(tuple(int(x) for x in k[2:].split(",")), int(f[2:]), precision)

    def plan(self, version: int = 1, origin: str = "profiling") -> Plan:
        return Plan(version, self.experts_per_layer, self.update_frequency, origin=origin, precision=self.precision)


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


def sample(num_experts: Sequence[int], index: int, seed: int = 0, precisions: Sequence[str] = ()) -> Configuration:
    """Configuration ``index`` of ``seed`` for layers of ``num_experts`` experts, its layers' precision
    drawn among the checkpoint's and ``precisions`` (the lower ones every layer is kept at)."""
    rng = np.random.default_rng([seed, index])
    layers = len(num_experts)
    total = int(rng.integers(layers, sum(num_experts) + 1))
    if index % EVEN_EVERY == 0:
        shares = np.ones(layers)
    else:
        shares = rng.dirichlet(np.full(layers, 10 ** rng.uniform(-1, np.log10(30))))
    frequency = int(rng.choice(UPDATE_FREQUENCIES))
    return Configuration(allocate(total, shares, num_experts), frequency, _precision(rng, layers, precisions))


def _precision(rng: np.random.Generator, layers: int, precisions: Sequence[str]) -> tuple[str, ...]:
    if not precisions:
        return ()
    draw = rng.random()
    if draw < NATIVE_SHARE:
        return ()
    if draw < NATIVE_SHARE + UNIFORM_SHARE:
        return (str(rng.choice(precisions)),) * layers
    return tuple(str(p) for p in rng.choice(("", *precisions), layers))


def sample_many(num_experts: Sequence[int], count: int, seed: int = 0,
                keep: Callable[[Configuration], bool] = lambda config: True,
                precisions: Sequence[str] = ()) -> list[Configuration]:
    """The first ``count`` distinct configurations of ``seed`` that ``keep`` accepts, in order: a
    filtered run is still deterministic, and a longer one a superset of a shorter one."""
    out, seen, index = [], set(), 0
    while len(out) < count:
        config = sample(num_experts, index, seed, precisions)
        index += 1
        if config.key not in seen and keep(config):
            seen.add(config.key)
            out.append(config)
        if index > 100 * count + 1000:
            break  # a tiny model (or a tight filter) has fewer distinct configurations than asked for
    return out
