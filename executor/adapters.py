"""Where each supported architecture keeps its MoE blocks, routers and experts.

Architectures differ only by this small table: the attribute of the router in
a block, how the router selects experts, and where expert ``i``'s weights are
(packed 3D tensors in transformers 5's Mixtral family, per-expert modules in
Switch Transformers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.executor import quantization
from swapmoe.executor.gating import MaskedRouter, MaskedTop1Router, Select, select_sigmoid_group_topk, select_softmax_topk
from swapmoe.executor.slot_experts import OneHot, Packed


class UnsupportedModel(ValueError):
    """The checkpoint's layout is not one the executor can serve."""


def not_supported(model_class: str, model_type: str) -> UnsupportedModel:
    return UnsupportedModel(f"model class {model_class} (model_type {model_type!r}) is not supported; "
                            f"supported model types: {', '.join(sorted(ADAPTERS))}")


def _packed_expert(experts: nn.Module, i: int) -> list[torch.Tensor]:
    return [experts.gate_up_proj[i], experts.down_proj[i]]


def _module_expert(experts: nn.Module, i: int) -> list[torch.Tensor]:
    return list(experts[f"expert_{i}"].parameters())


# How an expert is stored on disk by save_pretrained: the key of one part of expert ``e`` of a
# block, and, per runtime tensor, the disk parts concatenated (dim 0) to make it.
_QWEN_PARTS = (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))
_MIXTRAL_PARTS = (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",)))
_SWITCH_PARTS = (("wi", ("wi",)), ("wo", ("wo",)))


@dataclass(frozen=True, slots=True)
class Adapter:
    router_attr: str
    router_class: type[MaskedRouter]
    select: Select | None
    expert_tensors: Callable[[nn.Module, int], list[torch.Tensor]]
    disk_parts: tuple = _QWEN_PARTS
    disk_key: str = "{block}.experts.{expert}.{part}.weight"
    disk_block_rename: tuple[str, str] = ("", "")  # runtime block path fragment -> disk fragment
    slots: type = Packed  # how routing reaches the experts module (see executor.slot_experts)

    def disk_name(self, name: str) -> str:
        """A runtime module or tensor path as ``save_pretrained`` names it on disk."""
        return name.replace(*self.disk_block_rename) if self.disk_block_rename[0] else name

    def disk_keys(self, block: str, expert: int) -> list[tuple[str, tuple[str, ...]]]:
        """(runtime tensor name, disk keys concatenated to make it) for one expert."""
        block = self.disk_name(block)
        return [(name, tuple(self.disk_key.format(block=block, expert=expert, part=p) for p in parts))
                for name, parts in self.disk_parts]


_PACKED_SOFTMAX = Adapter("gate", MaskedRouter, select_softmax_topk, _packed_expert)
ADAPTERS: dict[str, Adapter] = {
    "mixtral": Adapter("gate", MaskedRouter, select_softmax_topk, _packed_expert, _MIXTRAL_PARTS,
                       disk_block_rename=(".mlp", ".block_sparse_moe")),
    "qwen2_moe": _PACKED_SOFTMAX,
    "qwen3_moe": _PACKED_SOFTMAX,
    "olmoe": _PACKED_SOFTMAX,
    "deepseek_v3": Adapter("gate", MaskedRouter, select_sigmoid_group_topk, _packed_expert),
    "switch_transformers": Adapter("router", MaskedTop1Router, None, _module_expert, _SWITCH_PARTS,
                                   "{block}.experts.expert_{expert}.{part}.weight", slots=OneHot),
}


@dataclass(frozen=True, slots=True)
class MoeBlock:
    """One MoE block of a loaded model."""

    name: str
    module: nn.Module
    num_experts: int
    top_k: int

    @property
    def experts(self) -> nn.Module:
        return self.module.experts


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ADAPTERS:
        raise not_supported(type(model).__name__, model_type)
    return ADAPTERS[model_type]


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """The model's MoE blocks in forward order (encoder before decoder)."""
    adapter = adapter_for(model)
    blocks = []
    for name, module in model.named_modules():
        router = getattr(module, adapter.router_attr, None)
        if router is None or not hasattr(module, "experts") or isinstance(module, MaskedRouter):
            continue
        router = router.router if isinstance(router, MaskedRouter) else router
        blocks.append(MoeBlock(name, module, router.num_experts, getattr(router, "top_k", 1)))
    if not blocks:
        raise UnsupportedModel(f"model class {type(model).__name__} has no MoE block with a router and experts")
    return blocks


def expert_prefixes(blocks: list[MoeBlock]) -> tuple[str, ...]:
    """Name prefixes of the routed experts' tensors (everything else is dense)."""
    return tuple(f"{b.name}.experts." for b in blocks)


def expert_nbytes(adapter: Adapter, block: MoeBlock, expert: int) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.expert_tensors(block.experts, expert))


def expert_norms(adapter: Adapter, block: MoeBlock) -> torch.Tensor:
    """||E_i|| per expert: the Frobenius norm over all of expert i's weights."""
    with torch.no_grad():
        return torch.stack([
            torch.sqrt(sum(t.float().pow(2).sum() for t in adapter.expert_tensors(block.experts, i)))
            for i in range(block.num_experts)
        ])


def describe(model: nn.Module) -> ModelLayout:
    """The model's layout: MoE layers, bytes per expert, and dense bytes (all the rest)."""
    adapter = adapter_for(model)
    blocks = find_moe_blocks(model)
    layers = tuple(
        LayerLayout(i, b.name, b.num_experts, b.top_k, expert_nbytes(adapter, b, 0)) for i, b in enumerate(blocks)
    )
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    config = model.config
    return ModelLayout(
        architecture=config.model_type,
        model_class=type(model).__name__,
        layers=layers,
        dense_bytes=total - sum(l.num_experts * l.bytes_per_expert for l in layers),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        vocab_size=config.vocab_size,
        max_positions=_max_positions(config),
        encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
    )


def with_precisions(layout: ModelLayout, store, device: torch.device) -> ModelLayout:
    """``layout`` with the bytes per expert of each lower precision ``store`` keeps that computes
    on ``device`` (the slots hold an expert's stored parts as they are)."""
    variants = [(p, store.manifest.variant(p)[1]) for p in store.manifest.precisions[1:]
                if quantization.runs_on(p, device)]
    layers = tuple(dataclasses.replace(l, precisions=tuple((p, specs[i].expert_bytes) for p, specs in variants))
                   for i, l in enumerate(layout.layers))
    return dataclasses.replace(layout, layers=layers)


def _max_positions(config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_length"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return 0


def install_masked_routers(model: nn.Module, norms: list[torch.Tensor] | None = None) -> list[MaskedRouter]:
    """Wrap every MoE block's router in a MaskedRouter (idempotent); returns them in layer order.
    ``norms`` (||E_i|| per layer) are computed from the experts' weights when not given."""
    adapter = adapter_for(model)
    routers = []
    for layer, block in enumerate(find_moe_blocks(model)):
        current = getattr(block.module, adapter.router_attr)
        if not isinstance(current, MaskedRouter):
            norm = norms[layer] if norms is not None else expert_norms(adapter, block)
            current = adapter.router_class(current, adapter.select, norm)
            setattr(block.module, adapter.router_attr, current)
        routers.append(current)
    return routers
