"""A packed experts module's slots held at a lower precision (``executor.quantization``).

``QuantizedSlots`` stands in for the model's own experts module inside ``SlotExperts`` when a
layer's plan names a precision other than the checkpoint's. It keeps one ``[capacity, ...]``
tensor per stored part (so slots resize, move and fill exactly as the model's own 3D
parameters do) and computes each routed slot with the weight-only kernels. The model's module
stays beside it, its weights emptied, for what is not a weight: the gating (``_apply_gate``),
the activation and an optional post-expert norm, so the forward is the model's own but for
the two matmuls.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from swapmoe.executor import quantization


class QuantizedSlots(nn.Module):
    def __init__(self, base: nn.Module, parts: Sequence[quantization.PartShape], precision: str):
        super().__init__()
        self._views: list | None = None
        object.__setattr__(self, "base", base)  # not a submodule: its emptied weights are not slots
        self.precision = precision
        # Per projection (up or gate-up, then down): the names of its stored tensors.
        self.projections = [[p.name for p in parts if p.name.removesuffix(quantization.SCALES) == name]
                            for name in dict.fromkeys(p.name.removesuffix(quantization.SCALES) for p in parts)]
        if len(self.projections) != 2:
            raise ValueError(f"quantized experts need an up and a down projection, not {list(self.projections)}")
        for p in parts:
            self.register_parameter(p.name, nn.Parameter(torch.empty((0, *p.shape), dtype=p.dtype),
                                                         requires_grad=False))
        self.num_experts = 0
        self.compute = quantization.COMPUTE  # the kernels' activations (tests: float32, exact)

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        self._views = None  # resized: views of the old slots would keep their memory

    def _stored(self, projection: int, slot: int) -> list[torch.Tensor]:
        """The stored tensors of ``slot``'s projection: views kept from pass to pass (indexing a
        slot is an operation of its own, four per expert on a decode step's every layer)."""
        if self._views is None:
            self._views = [[[getattr(self, name)[s] for name in names] for names in self.projections]
                           for s in range(self.num_experts)]
        return self._views[slot][projection]

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The packed experts forward (``index [T, K]`` in slot space, ``weights [T, K]``)."""
        if hidden.shape[0] == 1 and not self._post_norm:  # a decode step of one sequence
            return self._one_token(hidden, index[0].tolist(), weights[0])
        out = torch.zeros_like(hidden)
        flat, flat_weights = index.reshape(-1), weights.reshape(-1)
        for slot in torch.unique(flat).tolist():
            if slot >= self.num_experts:
                continue
            where = (flat == slot).nonzero().squeeze(1)
            tokens = where // index.shape[-1]
            out.index_add_(0, tokens, self._expert(hidden[tokens], slot) * flat_weights[where, None].to(hidden.dtype))
        return out

    def _one_token(self, hidden: torch.Tensor, slots: list[int], weights: torch.Tensor) -> torch.Tensor:
        """No gathering or scattering, and the activations stay in the kernels' dtype from the
        first matmul to the last: about a third of the operations of ``_expert`` per expert."""
        out = None
        first = getattr(self, self.projections[0][0])
        x = hidden.to(quantization.activations(self.precision, self.compute, [first]))
        for slot, weight in zip(slots, weights.to(hidden.dtype)):
            if slot < self.num_experts:
                h = self._gate(quantization.matmul(x, self._stored(0, slot), self.precision))
                y = quantization.matmul(h, self._stored(1, slot), self.precision).to(hidden.dtype) * weight
                out = y if out is None else out + y
        return torch.zeros_like(hidden) if out is None else out

    @property
    def _post_norm(self) -> bool:
        return getattr(self.base, "has_post_expert_norm", False)

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        return self.base._apply_gate(h) if getattr(self.base, "has_gate", True) else self.base.act_fn(h)

    def _expert(self, hidden: torch.Tensor, slot: int) -> torch.Tensor:
        h = self._gate(quantization.linear(hidden, self._stored(0, slot), self.precision, self.compute))
        h = quantization.linear(h, self._stored(1, slot), self.precision, self.compute)
        return self.base.post_expert_norm(h) if self._post_norm else h
