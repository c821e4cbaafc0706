"""The expert store: every (layer, expert) of a checkpoint addressable for one fast read.

``build_store`` rewrites a Hugging Face checkpoint's routed experts once into an
expert-major file: each expert's tensors, in the runtime's layout (e.g. Mixtral's
``w1``/``w3`` concatenated into ``gate_up_proj``), contiguous and aligned to 4 KiB, so a
load is one ``pread``. It reads the checkpoint tensor by tensor and never holds more
than one expert. ``ExpertStore`` reads experts back with ``O_DIRECT`` where the file
system allows it, so the OS page cache does not quietly keep the model in RAM.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from executor.adapters import UnsupportedModel, adapter_for, find_moe_blocks
from executor.checkpoint import auto_class, read_config

ALIGN = 4096
FORMAT = 1


@dataclass(frozen=True, slots=True)
class PartSpec:
    name: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class LayerSpec:
    module: str
    num_experts: int
    parts: tuple[PartSpec, ...]
    expert_bytes: int  # payload of one expert
    stride: int  # expert_bytes rounded up to ALIGN
    offset: int  # of expert 0 in the file

    def expert_offset(self, expert: int) -> int:
        return self.offset + expert * self.stride


@dataclass(frozen=True, slots=True)
class Manifest:
    architecture: str
    model_class: str
    dtype: str
    layers: tuple[LayerSpec, ...]
    file: str = "experts.bin"
    format: int = FORMAT

    def save(self, directory: Path) -> None:
        (directory / "manifest.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        raw = json.loads((directory / "manifest.json").read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{directory}: expert store format {raw.get('format')} is not {FORMAT}")
        layers = tuple(LayerSpec(l["module"], l["num_experts"], tuple(PartSpec(p["name"], tuple(p["shape"]),
                                                                               p["nbytes"]) for p in l["parts"]),
                                 l["expert_bytes"], l["stride"], l["offset"]) for l in raw["layers"])
        return cls(raw["architecture"], raw["model_class"], raw["dtype"], layers, raw["file"], raw["format"])


def meta_model(checkpoint: Path):
    """The model's skeleton on the meta device: module structure and shapes, no memory."""
    config = read_config(checkpoint)
    with torch.device("meta"):
        return auto_class(config).from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)


class _Checkpoint:
    """Tensor-by-tensor access to a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = directory / "model.safetensors"
            with safe_open(single, "pt") as f:
                self.where = {k: single for k in f.keys()}
        self._open = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise UnsupportedModel(f"checkpoint has no tensor {key!r}: its expert layout is not the one expected")
        path = self.where[key]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(key)


def build_store(checkpoint: Path, out: Path) -> Manifest:
    """Write ``out/experts.bin`` and ``out/manifest.json`` from ``checkpoint``'s routed experts."""
    checkpoint, out = Path(checkpoint), Path(out)
    model = meta_model(checkpoint)
    adapter = adapter_for(model)
    source = _Checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    layers, offset = [], 0
    tmp = out / "experts.bin.tmp"
    with open(tmp, "wb") as f:
        for block in find_moe_blocks(model):
            parts, stride = None, None
            for expert in range(block.num_experts):
                tensors = [(name, torch.cat([source.get(k) for k in keys], dim=0).contiguous())
                           for name, keys in adapter.disk_keys(block.name, expert)]
                payload = b"".join(t.view(torch.uint8).numpy().tobytes() for _, t in tensors)
                if parts is None:
                    parts = tuple(PartSpec(n, tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors)
                    stride = -(-len(payload) // ALIGN) * ALIGN
                f.write(payload + bytes(stride - len(payload)))
            layers.append(LayerSpec(block.name, block.num_experts, parts, sum(p.nbytes for p in parts), stride, offset))
            offset += stride * block.num_experts
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out / "experts.bin")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = Manifest(model.config.model_type, type(model).__name__, dtype, tuple(layers))
    manifest.save(out)
    return manifest


class ExpertStore:
    """Reads experts from an expert store; one ``pread`` per expert."""

    def __init__(self, directory: Path, direct: bool = True):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.dtype = getattr(torch, self.manifest.dtype)
        path = self.directory / self.manifest.file
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:  # e.g. tmpfs does not support O_DIRECT
                pass
        if not self.direct:
            self._fd = os.open(path, os.O_RDONLY)
        self.tier = "disk (O_DIRECT)" if self.direct else "disk (page cache dropped after reads)"

    def buffer(self, layer: int) -> mmap.mmap:
        """A page-aligned buffer for one expert of ``layer`` (O_DIRECT needs aligned memory)."""
        return mmap.mmap(-1, self.manifest.layers[layer].stride)

    def read_into(self, layer: int, expert: int, buffer: mmap.mmap) -> int:
        """Read one expert into ``buffer``; returns the bytes read."""
        spec = self.manifest.layers[layer]
        if not 0 <= expert < spec.num_experts:
            raise IndexError(f"layer {layer} has no expert {expert}")
        offset = spec.expert_offset(expert)
        done = os.preadv(self._fd, [memoryview(buffer)[:spec.stride]], offset)
        if done < spec.expert_bytes:
            raise OSError(f"short read of expert ({layer}, {expert}): {done} of {spec.expert_bytes} bytes")
        if not self.direct:
            os.posix_fadvise(self._fd, offset, spec.stride, os.POSIX_FADV_DONTNEED)
        return spec.expert_bytes

    def tensors(self, layer: int, buffer: mmap.mmap) -> dict[str, torch.Tensor]:
        """Views of the expert in ``buffer`` as its runtime tensors (no copy)."""
        spec = self.manifest.layers[layer]
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=spec.expert_bytes)
        out, start = {}, 0
        for part in spec.parts:
            out[part.name] = raw[start:start + part.nbytes].view(self.dtype).view(part.shape)
            start += part.nbytes
        return out

    def close(self) -> None:
        os.close(self._fd)
