"""The model without its routed experts: built on the meta device, dense weights loaded.

The skeleton comes from the checkpoint's config with parameters on the meta device (no
memory) and buffers real, so buffers that checkpoints do not store (e.g. rotary
``inv_freq``) are computed as usual. Dense weights then come from the expert store's
``dense.safetensors``; routed experts stay on meta until the runtime gives them slots.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from swapmoe.executor import lowered_dense
from swapmoe.executor.adapters import ADAPTERS, UnsupportedModel, expert_prefixes, find_moe_blocks
from swapmoe.executor.checkpoint import auto_class, read_config
from swapmoe.executor.slot_experts import Packed
from swapmoe.executor.safetensors_io import SafetensorsReader
from swapmoe.executor.store import Manifest


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get meta parameters. torch.empty does not touch pages, so
    building a large layer and moving it to meta costs no resident memory."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(checkpoint: Path, store_dir: Path, manifest: Manifest, device: torch.device,
                   dense_precision: str = "") -> nn.Module:
    """The model with dense weights on ``device`` (at ``dense_precision``, see
    ``executor.lowered_dense``; "": the checkpoint's) and routed experts still on meta."""
    config = read_config(checkpoint)
    if ADAPTERS[config.model_type].slots is Packed:  # see executor.slot_experts
        config._experts_implementation = "grouped_mm"
    dtype = getattr(torch, manifest.dtype)
    lowered_dense.check(dense_precision, dtype, device)
    with parameters_on_meta():
        model = auto_class(config).from_config(config, dtype=dtype)
    lowered = lowered_dense.lowered_linears(model, dense_precision)
    dense = {name: tensor for name, tensor in _read_dense(store_dir / manifest.dense_file, device)
             if not lowered_dense.lower(model, lowered, name, tensor, dense_precision)}
    model.load_state_dict(dense, strict=False, assign=True)
    model.tie_weights()
    experts = expert_prefixes(find_moe_blocks(model))
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(experts)]
    if missing:
        raise UnsupportedModel(f"model class {type(model).__name__}: the checkpoint has no weights for "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for module in model.modules():  # buffers were built on the CPU
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    return model.eval()


def _read_dense(path: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense weights, a tensor at a time outside any memory map (``safetensors.load_file``
    maps the file, and the pages it touched count in the resident set beside the copies)."""
    reader = SafetensorsReader(path)
    try:
        for name in reader.specs:
            yield name, reader.get(name).to(device)
    finally:
        reader.close()
