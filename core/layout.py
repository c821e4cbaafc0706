"""What a checkpoint looks like to a planner: MoE layers, experts and their sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_BYTES, MAX_EXPERTS_PER_LAYER, MAX_LAYERS, check_range, check_text


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """One MoE layer; ``index`` counts MoE layers only."""

    index: int
    module: str
    num_experts: int
    top_k: int
    bytes_per_expert: int


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """A model's MoE layers plus the bytes that are always resident (``dense_bytes``)."""

    architecture: str
    model_class: str
    layers: tuple[LayerLayout, ...]
    dense_bytes: int
    dtype: str = "float32"
    vocab_size: int = 0
    max_positions: int = 0
    encoder_decoder: bool = False  # seq2seq: the output answers the prompt instead of continuing it

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + sum(l.num_experts * l.bytes_per_expert for l in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def expert_bytes(self, experts_per_layer) -> int:
        """Bytes of the expert slots a plan keeps resident."""
        return sum(k * l.bytes_per_expert for k, l in zip(experts_per_layer, self.layers, strict=True))


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    kind: str
    name: str
    memory_bytes: int
    cpu_count: int
    hostname: str = field(default="")


def validate_layout(layout: ModelLayout, field: str = "layout") -> None:
    """Raise InvalidField unless ``layout`` describes a model some device could hold: at least one
    MoE layer, each with 1 to ``MAX_EXPERTS_PER_LAYER`` experts of at least one byte, and
    ``MAX_BYTES`` in all (a layout from the wire is checked before anything plans with it)."""
    check_text(f"{field}.architecture", layout.architecture)
    check_text(f"{field}.model_class", layout.model_class)
    check_text(f"{field}.dtype", layout.dtype)
    check_range(f"{field}.layers", layout.num_layers, 1, MAX_LAYERS)
    for i, layer in enumerate(layout.layers):
        name = f"{field}.layers[{i}]"
        if layer.index != i:
            raise InvalidField(f"{name}.index", f"is {layer.index}; layers are numbered 0, 1, ... in order")
        check_text(f"{name}.module", layer.module)
        check_range(f"{name}.num_experts", layer.num_experts, 1, MAX_EXPERTS_PER_LAYER)
        check_range(f"{name}.top_k", layer.top_k, 1, layer.num_experts)
        check_range(f"{name}.bytes_per_expert", layer.bytes_per_expert, 1, MAX_BYTES)
    check_range(f"{field}.dense_bytes", layout.dense_bytes, 0, MAX_BYTES)
    check_range(f"{field}.total_bytes", layout.total_bytes, 1, MAX_BYTES)
