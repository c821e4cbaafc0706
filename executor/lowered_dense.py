"""The dense weights (attention, shared experts, dense MLPs) held at a lower precision.

Every token reads every dense weight, so on a CPU their matmuls run at memory speed: the
float32 attention projections of issue 30's 1.8 GiB Mixtral were a quarter of a token's time.
``--dense-precision`` keeps them as the experts' lower precisions are kept
(``executor.quantization``: the same parts and kernels). Each weight is lowered as it is read
from the store, so the checkpoint's copy of only one tensor is ever held beside the lowered ones.

What stays at the checkpoint's precision: the routers and one-row gates (a few rows that decide
every routing),
the input and output embeddings (lookups, and the logits' last projection), the routed experts
(their precision is the plan's), and any weight the precision cannot hold (int4 needs
in-features in whole groups and out-features in multiples of 16).
"""

from __future__ import annotations

import torch
from torch import nn

from swapmoe.executor import quantization
from swapmoe.executor.adapters import adapter_for, expert_prefixes, find_moe_blocks
from swapmoe.executor.checkpoint import read_config


class LoweredLinear(nn.Module):
    """``nn.Linear`` whose weight is held as its parts at ``precision``."""

    def __init__(self, linear: nn.Linear, parts: list[torch.Tensor], precision: str):
        super().__init__()
        self.in_features, self.out_features, self.precision = linear.in_features, linear.out_features, precision
        for name, part in zip(part_names(precision), parts):
            self.register_buffer(name, part)
        self.bias = linear.bias  # loaded with the other dense tensors
        self.compute = quantization.COMPUTE  # the kernels' activations (tests: float32, exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = [getattr(self, name) for name in part_names(self.precision)]
        out = quantization.linear(x, stored, self.precision, self.compute)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, precision={self.precision}"


def part_names(precision: str) -> tuple[str, ...]:
    return ("weight", "weight" + quantization.SCALES) if precision in quantization.QUANTIZED else ("weight",)


def check(precision: str, native: torch.dtype, device: torch.device) -> None:
    """ValueError unless the dense weights can be held at ``precision`` ("": the checkpoint's)."""
    if precision and precision != quantization.name_of(native) and precision not in quantization.offered(native):
        raise ValueError(f"dense precision {precision!r} is not one of "
                         f"{', '.join(quantization.offered(native))} for a {quantization.name_of(native)} checkpoint")
    if precision and not quantization.runs_on(precision, device):
        raise ValueError(f"dense precision {precision} has no kernel on {device.type}")


def check_checkpoint(precision: str, checkpoint, device: torch.device) -> None:
    """``check`` against the checkpoint's config, before any store is built for it."""
    if precision:
        native = getattr(read_config(checkpoint), "dtype", None) or torch.float32
        check(precision, getattr(torch, native) if isinstance(native, str) else native, device)


def lowered_linears(model: nn.Module, precision: str) -> dict[str, nn.Linear]:
    """The linear modules (by name) whose weights run at ``precision``: see the module docstring."""
    native = next(p.dtype for p in model.parameters())
    if not precision or precision == quantization.name_of(native):
        return {}
    kept = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    router_attr = adapter_for(model).router_attr
    blocks = find_moe_blocks(model)
    routers = tuple(f"{b.name}.{router_attr}" for b in blocks)
    skipped = expert_prefixes(blocks) + tuple(f"{r}." for r in routers)
    chosen = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or id(module) in kept or name in routers or name.startswith(skipped):
            continue
        if module.out_features == 1:  # a one-row gate (Qwen2-MoE's shared expert's): kept as routers are
            continue
        try:
            quantization.parts("weight", (module.out_features, module.in_features), native, precision)
        except ValueError:  # a shape the precision cannot hold stays as it is
            continue
        chosen[name] = module
    return chosen


def lower(model: nn.Module, chosen: dict[str, nn.Linear], name: str, weight: torch.Tensor, precision: str) -> bool:
    """Put ``weight`` (the tensor ``name`` read from the store) into the model at ``precision``
    when its module is one of ``chosen``; False when it is not (the caller loads it as it is)."""
    owner, _, leaf = name.rpartition(".")
    if leaf != "weight" or owner not in chosen:
        return False
    parent, _, attr = owner.rpartition(".")
    setattr(model.get_submodule(parent), attr,
            LoweredLinear(chosen[owner], quantization.quantize(weight, precision), precision))
    return True
