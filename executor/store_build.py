"""Building the expert store (``executor.store``) from a Hugging Face checkpoint, once per
checkpoint.

``build_store`` reads the checkpoint tensor by tensor and never holds more than one expert;
what it wrote is read back whole before the manifest is saved. ``ensure_store`` finds a
checkpoint's store by a fingerprint of its files and builds it atomically when it is missing
or damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from swapmoe.core.errors import Corrupted
from swapmoe.executor.adapters import UnsupportedModel, adapter_for, expert_prefixes, find_moe_blocks
from swapmoe.executor.checkpoint import auto_class, read_config
from swapmoe.executor.store import (ALIGN, FORMAT, LayerSpec, Manifest, PartSpec, check_store, file_crc,
                                    verify_store)


def default_root() -> Path:
    """Where stores are built: ``$SWAPMOE_STORE_ROOT``, else ``~/.cache/swapmoe/stores``."""
    return Path(os.environ.get("SWAPMOE_STORE_ROOT") or Path.home() / ".cache" / "swapmoe" / "stores")


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

    def has(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise UnsupportedModel(f"checkpoint has no tensor {key!r}: its expert layout is not the one expected")
        path = self.where[key]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(key)


def build_store(checkpoint: Path, out: Path) -> Manifest:
    """Write ``out/experts.bin``, ``out/dense.safetensors`` and ``out/manifest.json`` from ``checkpoint``."""
    checkpoint, out = Path(checkpoint), Path(out)
    model = meta_model(checkpoint)
    adapter = adapter_for(model)
    source = _Checkpoint(checkpoint)
    blocks = find_moe_blocks(model)
    out.mkdir(parents=True, exist_ok=True)
    layers, offset = [], 0
    tmp = out / "experts.bin.tmp"
    progress = tqdm(total=sum(b.num_experts for b in blocks), desc="building the expert store", unit="expert",
                    disable=None)  # disabled when stderr is not a terminal
    with open(tmp, "wb") as f, progress:
        for block in blocks:
            parts, stride, norms, checksums = None, None, [], []
            for expert in range(block.num_experts):
                tensors = [(name, torch.cat([_finite(k, source.get(k)) for k in keys], dim=0).contiguous())
                           for name, keys in adapter.disk_keys(block.name, expert)]
                payload = b"".join(t.view(torch.uint8).numpy().tobytes() for _, t in tensors)
                checksums.append(zlib.crc32(payload))
                if parts is None:
                    parts = tuple(PartSpec(n, tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors)
                    stride = -(-len(payload) // ALIGN) * ALIGN
                norms.append(float(sum(t.double().pow(2).sum() for _, t in tensors) ** 0.5))
                f.write(payload + bytes(stride - len(payload)))
                progress.update()
            layers.append(LayerSpec(block.name, block.num_experts, parts, sum(p.nbytes for p in parts), stride,
                                    offset, tuple(norms), tuple(checksums)))
            offset += stride * block.num_experts
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out / "experts.bin")
    dense = {name: _finite(name, t) for name, t in _dense_tensors(model, adapter, blocks, source).items()}
    save_file(dense, out / "dense.safetensors")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = Manifest(model.config.model_type, type(model).__name__, dtype, tuple(layers),
                        sum(t.numel() * t.element_size() for t in dense.values()),
                        dense_checksum=file_crc(out / "dense.safetensors"))
    manifest.check(out)
    verify_store(out, manifest)  # what was written reads back whole
    manifest.save(out)
    return manifest


def _finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint with NaN or infinite weights would serve garbage: refuse it by name."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"checkpoint tensor {name!r} has NaN or infinite values; the checkpoint is damaged")
    return tensor


def _dense_tensors(model, adapter, blocks, source: _Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's non-expert tensors under the runtime's names. A runtime tensor missing on
    disk is left out: tied weights are re-tied on load, and anything else is reported there."""
    experts = expert_prefixes(blocks)
    dense = {}
    for name in model.state_dict():
        if name.startswith(experts):
            continue
        key = next((k for k in (name, adapter.disk_name(name)) if source.has(k)), None)
        if key is not None:
            dense[name] = source.get(key).contiguous()
    return dense


def fingerprint(checkpoint: Path) -> str:
    """Changes when the checkpoint's config or weight files change (name, size, mtime)."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha256(f"format {FORMAT}\n".encode())
    digest.update((checkpoint / "config.json").read_bytes())
    for path in sorted(checkpoint.glob("*.safetensors*")):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def ensure_store(checkpoint: Path, root: Path | None = None, log=print) -> Path:
    """The store for ``checkpoint`` under ``root``, built once (atomically: concurrent builders
    each write a private directory and the first rename wins)."""
    checkpoint = Path(checkpoint).resolve()
    read_config(checkpoint)  # a clear error for a directory that is not a supported checkpoint
    root = Path(root or default_root())
    final = root / f"{checkpoint.name}-{fingerprint(checkpoint)}"
    damage = None
    if final.exists():
        try:
            check_store(final)
            return final
        except Corrupted as error:
            damage = error
            log(f"the expert store {final} is damaged ({error}); rebuilding it from {checkpoint}")
    else:
        log(f"building the expert store for {checkpoint} in {final} (once per checkpoint)")
    private = root / f".{final.name}.{os.getpid()}"
    shutil.rmtree(private, ignore_errors=True)
    build_store(checkpoint, private)
    if damage is not None:  # set the damaged store aside; a reader that has it open keeps its files
        aside = root / f".{final.name}.damaged.{os.getpid()}"
        try:
            final.rename(aside)
        except OSError:
            pass  # another process repaired it first
        shutil.rmtree(aside, ignore_errors=True)
    try:
        private.rename(final)
    except OSError:  # another process finished first
        shutil.rmtree(private, ignore_errors=True)
    return final
