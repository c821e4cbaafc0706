"""What a checkpoint looks like to a planner: MoE layers, experts and their sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

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
    # (precision, bytes per expert) of each lower precision the executor's store keeps the
    # layer's experts at (executor.quantization); the checkpoint's own is bytes_per_expert.
    precisions: tuple[tuple[str, int], ...] = ()

    def bytes_at(self, precision: str) -> int:
        """Bytes of one expert at ``precision`` ("": the checkpoint's); KeyError when not kept."""
        if not precision:
            return self.bytes_per_expert
        for name, nbytes in self.precisions:
            if name == precision:
                return nbytes
        raise KeyError(precision)


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

    @property
    def precisions(self) -> tuple[str, ...]:
        """The lower precisions every layer's experts are kept at (a plan may name them)."""
        if not self.layers:
            return ()
        return tuple(p for p, _ in self.layers[0].precisions
                     if all(p in dict(l.precisions) for l in self.layers[1:]))

    @property
    def smallest_precision(self) -> tuple[str, ...]:
        """Per layer, the precision that holds an expert in the fewest bytes ("": the checkpoint's)."""
        return tuple(min((("", l.bytes_per_expert), *l.precisions), key=lambda p: p[1])[0] for l in self.layers)

    def at(self, precision: Sequence[str]) -> "ModelLayout":
        """This layout with each layer's experts at ``precision`` (per layer; "" or empty: the
        checkpoint's) as its ``bytes_per_expert``: what even splits and fits count with."""
        if not any(precision):
            return self
        layers = tuple(dataclasses.replace(l, bytes_per_expert=l.bytes_at(p)) for l, p in zip(self.layers, precision))
        return dataclasses.replace(self, layers=layers)

    def expert_bytes(self, experts_per_layer, precision: Sequence[str] = ()) -> int:
        """Bytes of the expert slots a plan keeps resident (``precision`` per layer; empty: the
        checkpoint's everywhere)."""
        if not precision:
            return sum(k * l.bytes_per_expert for k, l in zip(experts_per_layer, self.layers, strict=True))
        return sum(k * l.bytes_at(p) for k, l, p in zip(experts_per_layer, self.layers, precision, strict=True))


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
        for j, (precision, nbytes) in enumerate(layer.precisions):
            check_text(f"{name}.precisions[{j}].precision", precision)
            if not precision or precision in dict(layer.precisions[:j]):
                raise InvalidField(f"{name}.precisions[{j}].precision", f"{precision!r} is empty or listed twice")
            check_range(f"{name}.precisions[{j}].bytes_per_expert", nbytes, 1, MAX_BYTES)
    check_range(f"{field}.dense_bytes", layout.dense_bytes, 0, MAX_BYTES)
    check_range(f"{field}.total_bytes", layout.total_bytes, 1, MAX_BYTES)
