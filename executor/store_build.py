"""Building the expert store (``executor.store``) from a Hugging Face checkpoint, once per
checkpoint.

``build_store`` reads the checkpoint tensor by tensor (``executor.safetensors_io``: no
memory map, so its resident memory is one expert or one dense tensor, not the checkpoint)
and writes the dense file the same way; what it wrote is read back whole before the manifest
is saved. Meanwhile a second thread hashes the checkpoint's bytes for the model's fingerprint
(``core.fingerprint``), kept in the manifest so that no start hashes the checkpoint again.
``ensure_store`` finds a checkpoint's store by a fingerprint of its files' names, sizes and
times, and builds it atomically when it is missing or damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from swapmoe.core.errors import Corrupted
from swapmoe.core.fingerprint import model_fingerprint
from swapmoe.executor.adapters import UnsupportedModel, adapter_for, expert_prefixes, find_moe_blocks
from swapmoe.executor.checkpoint import auto_class, read_config
from swapmoe.executor.safetensors_io import SafetensorsReader, SafetensorsWriter, TensorSpec
from swapmoe.executor import quantization
from swapmoe.executor.slot_experts import Packed
from swapmoe.executor.store import (ALIGN, FORMAT, LayerSpec, Manifest, PartSpec, Variant, check_store, file_crc,
                                    part_views, verify_store)


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
            files = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = None
        paths = sorted(set(files.values())) if files else [directory / "model.safetensors"]
        self._readers = {path: SafetensorsReader(path) for path in paths}
        self.where = {k: reader for reader in self._readers.values() for k in reader.specs
                      if files is None or files.get(k) == reader.path}

    def has(self, key: str) -> bool:
        return key in self.where

    def spec(self, key: str) -> TensorSpec:
        self._check(key)
        return self.where[key].specs[key]

    def get(self, key: str) -> torch.Tensor:
        self._check(key)
        return self.where[key].get(key)

    def read_into(self, key: str, view: memoryview) -> None:
        self._check(key)
        self.where[key].read_into(key, view)

    def _check(self, key: str) -> None:
        if key not in self.where:
            raise UnsupportedModel(f"checkpoint has no tensor {key!r}: its expert layout is not the one expected")

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def build_store(checkpoint: Path, out: Path) -> Manifest:
    """Write ``out/experts.bin`` (and one experts file per lower precision), ``out/dense.safetensors``
    and ``out/manifest.json`` from ``checkpoint``."""
    checkpoint, out = Path(checkpoint), Path(out)
    model = meta_model(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    source = _Checkpoint(checkpoint)
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash") as pool:
        content = pool.submit(model_fingerprint, checkpoint)  # hashlib lets go of the GIL: a core of its own
        try:
            files = _write_experts(model, source, out)
            dense_bytes = _write_dense(model, source, out / "dense.safetensors")
        finally:
            source.close()
        fingerprint = content.result()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    (_, layers), *variants = files.items()
    manifest = Manifest(model.config.model_type, type(model).__name__, dtype, tuple(layers), dense_bytes,
                        dense_checksum=file_crc(out / "dense.safetensors"), model_fingerprint=fingerprint,
                        variants=tuple(Variant(p, _file_of(p), tuple(l)) for p, l in variants),
                        int4_layout=quantization.int4_layout_tag())
    manifest.check(out)
    verify_store(out, manifest)  # what was written reads back whole
    manifest.save(out)
    return manifest


def _file_of(precision: str) -> str:
    return f"experts.{precision}.bin"


def _variants(adapter, parts: tuple[PartSpec, ...], dtype: torch.dtype) -> dict[str, tuple[PartSpec, ...]]:
    """The lower precisions a layer of these parts can be stored at (quantized experts run in
    the packed-experts forward only), each with its parts."""
    if adapter.slots is not Packed:
        return {}
    out = {}
    for precision in quantization.offered(dtype):
        try:
            out[precision] = tuple(PartSpec(q.name, q.shape, q.nbytes, quantization.name_of(q.dtype))
                                   for p in parts for q in quantization.parts(p.name, p.shape, dtype, precision))
        except ValueError:
            continue
    return out


class _ExpertsWriter:
    """One experts file being written: expert-major, each expert in a buffer of the layer's stride."""

    def __init__(self, path: Path):
        self.tmp, self.path = path.with_name(path.name + ".tmp"), path
        self.file = open(self.tmp, "wb")
        self.layers, self.offset = [], 0

    def begin(self, parts: tuple[PartSpec, ...]) -> None:
        self.parts = parts
        self.expert_bytes = sum(p.nbytes for p in parts)
        self.stride = -(-self.expert_bytes // ALIGN) * ALIGN
        self.buffer = torch.zeros(self.stride, dtype=torch.uint8)  # the padding stays zero
        self.checksums = []

    def write(self, tensors: list[torch.Tensor] | None = None) -> None:
        """The expert in ``buffer`` (already there), or ``tensors`` copied in first."""
        view, position = memoryview(self.buffer.numpy()), 0
        for t in tensors or ():
            raw = t.contiguous().view(torch.uint8).reshape(-1)
            self.buffer[position:position + raw.numel()] = raw
            position += raw.numel()
        self.checksums.append(zlib.crc32(view[:self.expert_bytes]))
        self.file.write(view)

    def end(self, module: str, norms: list[float]) -> None:
        self.layers.append(LayerSpec(module, len(norms), self.parts, self.expert_bytes, self.stride, self.offset,
                                     tuple(norms), tuple(self.checksums)))
        self.offset += self.stride * len(norms)

    def close(self) -> list[LayerSpec]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.path)
        return self.layers


def _write_experts(model, source: _Checkpoint, out: Path) -> dict[str, list[LayerSpec]]:
    """The routed experts, expert-major and page-aligned, in the checkpoint's dtype and in each
    lower precision every layer can be stored at; layers by precision, the checkpoint's first.
    Each expert is read from the checkpoint straight into one buffer of the layer's stride (its
    runtime layout: concatenating tensors along dim 0 is concatenating their bytes), checked,
    quantized and written: those buffers are all the memory an expert takes."""
    adapter, blocks = adapter_for(model), find_moe_blocks(model)
    dtype = next(model.parameters()).dtype
    plans = [(block, _parts(source, adapter.disk_keys(block.name, 0))) for block in blocks]
    lower = [_variants(adapter, parts, dtype) for _, parts in plans]
    precisions = [p for p in quantization.offered(dtype) if all(p in v for v in lower)]
    writers = {quantization.name_of(dtype): _ExpertsWriter(out / "experts.bin"),
               **{p: _ExpertsWriter(out / _file_of(p)) for p in precisions}}
    native = writers[quantization.name_of(dtype)]
    progress = tqdm(total=sum(b.num_experts for b in blocks), desc="building the expert store", unit="expert",
                    disable=None)  # disabled when stderr is not a terminal
    try:
        with progress:
            for (block, parts), variants in zip(plans, lower):
                native.begin(parts)
                for p in precisions:
                    writers[p].begin(variants[p])
                norms = []
                for expert in range(block.num_experts):
                    _read_expert(source, adapter, block, expert, parts, native, dtype)
                    norms.append(_norm(native.buffer[:native.expert_bytes].view(dtype)))
                    weights = part_views(native.buffer, parts, quantization.name_of(dtype)).values()
                    native.write()
                    for p in precisions:
                        writers[p].write([q for w in weights for q in quantization.quantize(w, p)])
                    progress.update()
                for writer in writers.values():
                    writer.end(block.name, norms)
        return {p: w.close() for p, w in writers.items()}
    finally:
        for writer in writers.values():
            writer.file.close()


def _read_expert(source: _Checkpoint, adapter, block, expert: int, parts: tuple[PartSpec, ...],
                 native: _ExpertsWriter, dtype: torch.dtype) -> None:
    """Expert ``expert`` of ``block`` from the checkpoint into ``native``'s buffer, checked."""
    view, position = memoryview(native.buffer.numpy()), 0
    for (name, keys), part in zip(adapter.disk_keys(block.name, expert), parts):
        for key in keys:
            nbytes = _expect(source, key, part, dtype)
            source.read_into(key, view[position:position + nbytes])
            _finite(key, native.buffer[position:position + nbytes].view(dtype))
            position += nbytes
    if position != native.expert_bytes:
        raise UnsupportedModel(f"expert {expert} of {block.name} has {position} bytes on disk, expert 0 "
                               f"{native.expert_bytes}: the checkpoint's experts differ in shape")


def _parts(source: _Checkpoint, disk_keys) -> tuple[PartSpec, ...]:
    """An expert's runtime tensors, from its first expert's tensors on disk."""
    parts = []
    for name, keys in disk_keys:
        specs = [source.spec(k) for k in keys]
        shape = (sum(s.shape[0] for s in specs), *specs[0].shape[1:])
        parts.append(PartSpec(name, shape, sum(s.nbytes for s in specs)))
    return tuple(parts)


def _expect(source: _Checkpoint, key: str, part: PartSpec, dtype: torch.dtype) -> int:
    """The bytes of ``key``, once it is known to be a slice of ``part`` in the model's dtype."""
    spec = source.spec(key)
    if spec.dtype != dtype or spec.shape[1:] != part.shape[1:]:
        raise UnsupportedModel(f"checkpoint tensor {key!r} is {str(spec.dtype)[6:]} {list(spec.shape)}; the "
                               f"model's config makes its experts {str(dtype)[6:]} {list(part.shape)}")
    return spec.nbytes


def _norm(weights: torch.Tensor, chunk: int = 1 << 18) -> float:
    """||E_i||, in double precision, a chunk at a time (no double-sized copy of the expert)."""
    return float(sum(c.double().pow(2).sum() for c in weights.split(chunk)) ** 0.5)


def _write_dense(model, source: _Checkpoint, path: Path) -> int:
    """The non-expert tensors under the runtime's names, streamed; returns their bytes."""
    keys = _dense_keys(model, source)
    specs = {name: source.spec(key) for name, key in keys.items()}
    writer = SafetensorsWriter(path, specs)
    for name, key in keys.items():
        writer.write(name, _finite(name, source.get(key)))
    writer.close()
    return sum(spec.nbytes for spec in specs.values())


def _finite(name: str, tensor: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """A checkpoint with NaN or infinite weights would serve garbage: refuse it by name."""
    if tensor.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in tensor.reshape(-1).split(chunk)):
        raise ValueError(f"checkpoint tensor {name!r} has NaN or infinite values; the checkpoint is damaged")
    return tensor


def _dense_keys(model, source: _Checkpoint) -> dict[str, str]:
    """Runtime name -> checkpoint key of every non-expert tensor. A runtime tensor missing on
    disk is left out: tied weights are re-tied on load, and anything else is reported there."""
    adapter = adapter_for(model)
    experts = expert_prefixes(find_moe_blocks(model))
    dense = {}
    for name in model.state_dict():
        if name.startswith(experts):
            continue
        key = next((k for k in (name, adapter.disk_name(name)) if source.has(k)), None)
        if key is not None:
            dense[name] = key
    return dense


def fingerprint(checkpoint: Path) -> str:
    """Changes when the checkpoint's config or weight files change (name, size, mtime), or the CPU
    int4 kernel's layout (a store is not moved between machines that pack int4 differently)."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha256(f"format {FORMAT} int4 {quantization.int4_layout_tag()}\n".encode())
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
    try:
        build_store(checkpoint, private)
    except BaseException:  # a failed build leaves no gigabytes behind
        shutil.rmtree(private, ignore_errors=True)
        raise
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
