"""An attention's query, key and value projections as one matmul.

The three read the same input, so a decode pass can compute them at once: on a CPU each
small matmul has a fixed cost (int4 keys at 256 outputs take as long as a fifth of the
1024-output queries), paid three times per layer. ``fuse`` concatenates their weights along the
out-features, at the precision they are held at (the rows of the int4 kernel's packed layout and
of every scale are per out-feature, so concatenated parts are what quantizing the concatenated
weight would give, for int4 where each projection's rows fill whole packed blocks), and leaves
the three projections viewing their rows of it: no byte is added, and the model's own forward
(prefills) computes exactly what it did.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch
from torch import nn

from swapmoe.executor import quantization
from swapmoe.executor.lowered_dense import LoweredLinear, part_names


_FUSED: "weakref.WeakKeyDictionary[nn.Module, nn.Module | None]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def fuse(attention: nn.Module) -> nn.Module | None:
    """A module computing ``cat(q_proj(x), k_proj(x), v_proj(x), dim=-1)``; None when the three
    are not all ``nn.Linear`` or all ``LoweredLinear`` at one precision, or disagree on biases.
    Once per attention module (another batch over the same model shares it), again if a projection
    no longer views the fused weight (its weights were replaced)."""
    with _LOCK, torch.inference_mode(False), torch.no_grad():  # weights, not inference tensors (first use: in a pass)
        fused = _FUSED.get(attention, False)
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        if fused is False or (fused is not None and not all(_views(p, fused) for p in projections)):
            fused = _FUSED[attention] = _fuse(projections)
        return fused


def _views(projection: nn.Module, fused: nn.Module) -> bool:
    return projection.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


def _fuse(projections: list[nn.Module]) -> nn.Module | None:
    if len({p.bias is None for p in projections}) != 1:
        return None
    if all(type(p) is nn.Linear for p in projections):
        fused = nn.Linear(projections[0].in_features, sum(p.out_features for p in projections),
                          bias=projections[0].bias is not None, device="meta")
        fused.weight = nn.Parameter(_rows(projections, "weight", dim=0), requires_grad=False)
    elif all(isinstance(p, LoweredLinear) for p in projections) and len({p.precision for p in projections}) == 1:
        precision = projections[0].precision
        if precision == "int4" and not quantization.int4_rows_concatenate(tuple(p.out_features for p in projections)):
            return None  # rows that do not fill the kernel's packed blocks
        template = nn.Linear(projections[0].in_features, sum(p.out_features for p in projections),
                             bias=False, device="meta")
        dims = [1 if name.endswith(quantization.SCALES) and precision == "int4" else 0
                for name in part_names(precision)]
        fused = LoweredLinear(template, [_rows(projections, name, dim) for name, dim in
                                         zip(part_names(precision), dims)], precision)
        fused.compute = projections[0].compute
    else:
        return None
    if projections[0].bias is not None:
        fused.bias = nn.Parameter(_rows(projections, "bias", dim=0), requires_grad=False)
    return fused


def _rows(projections: Sequence[nn.Module], name: str, dim: int) -> torch.Tensor:
    """The projections' ``name`` tensors concatenated along ``dim`` (their out-features); each
    projection is left holding a view of its own rows."""
    whole = torch.cat([getattr(p, name) for p in projections], dim=dim)
    start = 0
    for p in projections:
        size = getattr(p, name).shape[dim]
        view = whole.narrow(dim, start, size)
        if isinstance(getattr(p, name), nn.Parameter):
            setattr(p, name, nn.Parameter(view, requires_grad=False))
        else:
            setattr(p, name, view)  # a registered buffer: replaced in place
        start += size
    return whole
