"""A MoE block's experts held in ``k`` slots instead of ``E`` (the paper's Virtual Experts).

``SlotExperts`` replaces a block's ``experts`` module. The block keeps calling it with
routing in *expert* space (from the masked router); it translates that routing to
*slot* space through a table and calls the model's own experts module, whose weights
now hold ``k`` slots. The table is replaced as a whole between forward passes, so a
forward pass sees either the old mapping or the new one, never a mix.

Two routing shapes exist: packed experts (Mixtral family) take ``index [T, K]`` with
``E`` meaning "no expert"; Switch takes a one-hot ``dispatch [T, 1, E]``. ``Packed`` and
``OneHot`` hide the difference.

Packed experts run transformers' ``grouped_mm`` experts forward (one grouped matmul per
projection; ``executor.skeleton`` selects it) rather than the eager one (a Python loop over
the experts a pass routes to): a batch of 16 decoding sequences reaches most experts of a
layer, and that loop was most of the pass. ``grouped_mm`` has no "no expert" index outside
expert parallelism, so such assignments go to a slot that holds an expert, with weight zero.
"""

from __future__ import annotations

import copy
import math
import mmap
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from swapmoe.executor import quantization
from swapmoe.executor.quantized_experts import QuantizedSlots


def page_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialized memory; on the CPU page-aligned (an anonymous mapping), so slots can be
    filled by ``O_DIRECT`` reads with no staging copy. Pages are committed as slots fill."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


def call(module: nn.Module, *args):
    """``module(*args)``, skipping nn.Module's call machinery when no hook is registered: the
    wrappers here run in every MoE layer of every forward pass, where it shows (about 1% of a
    small model's token; transformers' output recorders are hooks, and still run)."""
    hooked = module._forward_hooks or module._forward_pre_hooks or _module._global_forward_hooks \
        or _module._global_forward_pre_hooks
    return module(*args) if hooked else module.forward(*args)


@dataclass(frozen=True, slots=True)
class SlotTable:
    """Where each expert is: ``slot_of`` [E+1] (``capacity``: nowhere; index E is "no expert"),
    ``expert_in_slot`` [capacity] (E: empty); ``identity`` when expert i is in slot i for all;
    ``spare``: a slot holding an expert (-1: none), where assignments to no expert go with
    weight zero (an empty or loading slot may hold anything, NaN included)."""

    slot_of: torch.Tensor
    expert_in_slot: torch.Tensor
    identity: bool
    spare: int = -1


class Packed:
    """Routing ``index [T, K]`` in 0..E (E: no expert); weights are 3D ``[slots, ...]`` parameters."""

    @staticmethod
    def run(inner: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
            table: SlotTable | None) -> torch.Tensor:
        """The experts on ``index`` in expert space (``table``: None when expert i is in slot i)."""
        if table is not None:
            if table.spare < 0:  # no expert resident: every assignment goes nowhere
                return torch.zeros_like(hidden)
            slots = table.slot_of[index]
            routed = slots < table.expert_in_slot.numel()
            index, weights = torch.where(routed, slots, table.spare), weights * routed
        return call(inner, hidden, index, weights)

    @staticmethod
    def needed(index: torch.Tensor, num_experts: int) -> list[int]:
        return torch.unique(index[index < num_experts]).tolist()

    @staticmethod
    def restrict(index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Assignments to experts outside ``keep`` ([E+1] bool, False at E) become E."""
        return torch.where(keep[index], index, keep.numel() - 1)

    @staticmethod
    def slot_tensors(inner: nn.Module, slot: int) -> dict[str, torch.Tensor]:
        return {name: p[slot] for name, p in inner.named_parameters(recurse=False)}

    @staticmethod
    def resize(inner: nn.Module, capacity: int, moves: dict[int, int], device) -> None:
        for name, old in list(inner.named_parameters(recurse=False)):
            new = page_aligned_empty((capacity, *old.shape[1:]), old.dtype, torch.device(device))
            if moves and old.device.type != "meta":
                src, dst = zip(*sorted(moves.items()))
                new[list(dst)] = old.data[list(src)]
            setattr(inner, name, nn.Parameter(new, requires_grad=False))
        inner.num_experts = capacity


class OneHot:
    """Routing ``dispatch [T, 1, E]`` one-hot; experts are modules ``expert_{slot}`` (Switch)."""

    @staticmethod
    def run(inner: nn.Module, hidden: torch.Tensor, dispatch: torch.Tensor, weights: torch.Tensor,
            table: SlotTable | None) -> torch.Tensor:
        if table is not None:
            dispatch = nn.functional.pad(dispatch, (0, 1))[..., table.expert_in_slot]
        return call(inner, hidden, dispatch, weights)

    @staticmethod
    def needed(dispatch: torch.Tensor, num_experts: int) -> list[int]:
        return dispatch.sum(dim=(0, 1)).nonzero().flatten().tolist()

    @staticmethod
    def restrict(dispatch: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return dispatch * keep[:-1].to(dispatch.dtype)

    @staticmethod
    def slot_tensors(inner: nn.Module, slot: int) -> dict[str, torch.Tensor]:
        return {name.removesuffix(".weight"): p for name, p in inner[f"expert_{slot}"].named_parameters()}

    @staticmethod
    def resize(inner: nn.ModuleDict, capacity: int, moves: dict[int, int], device) -> None:
        old = {int(k.removeprefix("expert_")): inner[k] for k in list(inner.keys())}
        template = next(iter(old.values()))
        for key in list(inner.keys()):
            del inner[key]
        kept = {new: old[src] for src, new in moves.items()}
        for slot in range(capacity):
            module = kept.get(slot)
            if module is None:
                module = OneHot._empty_like(template, torch.device(device))
            inner[f"expert_{slot}"] = module
        inner.num_experts = capacity

    @staticmethod
    def _empty_like(template: nn.Module, device: torch.device) -> nn.Module:
        """A copy of ``template`` with fresh page-aligned weights (``page_aligned_empty``: slots are
        filled by ``O_DIRECT`` reads straight from the store), never a copy of its weights."""
        memo = {id(p): None for p in template.parameters()}  # the copy gets no weights to copy
        module = copy.deepcopy(template, memo)
        for source, owner in zip(template.modules(), module.modules()):
            for name, old in source._parameters.items():
                if old is not None:
                    owner._parameters[name] = nn.Parameter(page_aligned_empty(tuple(old.shape), old.dtype, device),
                                                           requires_grad=False)
        return module


class SlotExperts(nn.Module):
    """``experts(hidden, routing, weights)`` over ``capacity`` slots, routing given in expert space."""

    def __init__(self, inner: nn.Module, kind, num_experts: int):
        super().__init__()
        self.inner = inner
        self.kind = kind
        self.num_experts = num_experts
        self.capacity = 0
        self.precision = ""  # of the slots' weights; "": the checkpoint's (see set_precision)
        self.slots = SlotTable(torch.zeros(num_experts + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), False)
        self.device = torch.device("cpu")  # of the slots, set by ``resize``
        # On-demand strategy: ``load_now(experts)`` makes those experts resident before use.
        self.load_now: Callable[[list[int]], None] | None = None

    def set_precision(self, precision: str, parts: Sequence[quantization.PartShape], device) -> None:
        """Hold the slots at ``precision`` ("": the model's own weights, in ``parts`` otherwise);
        every slot is emptied first (the caller refills them), so the old and the new slots are
        never held together."""
        if precision and self.kind is not Packed:
            raise ValueError(f"{type(self.inner).__name__} experts run at the checkpoint's precision only")
        base = self.inner.base if isinstance(self.inner, QuantizedSlots) else self.inner
        self.kind.resize(self.inner, 0, {}, device)
        self.inner = QuantizedSlots(base, parts, precision) if precision else base
        self.precision = precision
        self.capacity = 0

    def resize(self, capacity: int, moves: dict[int, int], device) -> None:
        self.kind.resize(self.inner, capacity, moves, device)
        self.capacity = capacity
        self.device = torch.device(device)

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return self.kind.slot_tensors(self.inner, slot)

    def table(self, ready: Mapping[int, int]) -> SlotTable:
        """The expert -> slot table for ``ready`` (experts absent from it route nowhere); any thread."""
        slot_of = [self.capacity] * (self.num_experts + 1)
        expert_in_slot = [self.num_experts] * self.capacity
        for expert, slot in ready.items():
            slot_of[expert], expert_in_slot[slot] = slot, expert
        identity = len(ready) == self.num_experts == self.capacity and all(e == s for e, s in ready.items())
        return SlotTable(torch.tensor(slot_of, device=self.device), torch.tensor(expert_in_slot, device=self.device),
                         identity, min(ready.values(), default=-1))

    def install(self, table: SlotTable) -> None:
        """Route by ``table`` from the next forward pass on (between passes only)."""
        self.slots = table

    def forward(self, hidden: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.load_now is not None:
            return self._on_demand(hidden, routing, weights)
        table = None if self.slots.identity else self.slots  # identity: routing is in slot space already
        return self.kind.run(self.inner, hidden, routing, weights, table)

    def _on_demand(self, hidden, routing, weights):
        """Serve every routed expert exactly, loading misses, in groups that fit the slots."""
        needed = self.kind.needed(routing, self.num_experts)
        resident = set((self.slots.slot_of[:-1] < self.capacity).nonzero().flatten().tolist())
        needed.sort(key=lambda e: e not in resident)  # use what is there before loading more
        out = None
        for start in range(0, len(needed), self.capacity):
            group = needed[start:start + self.capacity]
            self.load_now(group)
            keep = torch.zeros(self.num_experts + 1, dtype=torch.bool, device=routing.device)
            keep[group] = True
            part = self.kind.run(self.inner, hidden, self.kind.restrict(routing, keep), weights, self.slots)
            out = part if out is None else out + part
        return out if out is not None else torch.zeros_like(hidden)
