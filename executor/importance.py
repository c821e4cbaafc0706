"""What the virtual experts' updates rank experts by: one cumulative counter per layer.

Updates take the difference of a counter since the last update and add it to decayed scores,
so every mode shares that bookkeeping and differs only in what the counter counts:

- ``gate``: the paper's Eq. 1 (sum over routed tokens of ||x|| * |G(x)_i| * ||E_i||);
- ``count``: tokens routed to each expert (the unmasked router's choice), the ablation that
  drops the gate weights and the norms;
- ``random``: fresh uniform scores at each reading, from a seeded generator, so the resident set
  moves at random: the ablation's floor, reproducible with the same seed.
"""

from __future__ import annotations

import torch

from swapmoe.executor.gating import MaskedRouter

MODES = ("gate", "count", "random")


class Importance:
    """The cumulative counter of each layer under one mode (see the module docstring)."""

    def __init__(self, mode: str, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"importance must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        """Back to the state at construction (the random draws start over from the seed)."""
        self._generator = torch.Generator().manual_seed(self.seed)
        self._random: dict[int, torch.Tensor] = {}  # layer -> the sum of its draws

    def cumulative(self, index: int, router: MaskedRouter, draw: bool = True) -> torch.Tensor:
        """Layer ``index``'s counter now [E], float64 on the CPU; a fresh copy (callers keep it).
        In ``random`` mode a reading adds fresh draws (``draw``; False: the sum so far, a baseline
        to difference from), so the next update's difference is new noise."""
        if self.mode == "gate":
            return router.importance.detach().to("cpu", torch.double, copy=True)
        if self.mode == "count":
            return router.activations.detach().to("cpu", torch.double, copy=True)
        total = self._random.get(index, torch.zeros(router.num_experts, dtype=torch.double))
        if draw:
            total = self._random[index] = total + torch.rand(router.num_experts, generator=self._generator,
                                                             dtype=torch.double)
        return total.clone()
