"""What a checkpoint looks like to a planner: MoE layers, experts and their sizes."""

from __future__ import annotations

from dataclasses import dataclass, field


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
