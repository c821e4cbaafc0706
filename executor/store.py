"""The expert store: every (layer, expert) of a checkpoint addressable for one fast read.

A store (built once per checkpoint by ``executor.store_build``) holds the routed experts in an
expert-major file, each expert's tensors in the runtime's layout (e.g. Mixtral's ``w1``/``w3``
concatenated into ``gate_up_proj``), contiguous and aligned to 4 KiB, so a load is one
``pread``; the dense (non-expert) weights, under the runtime's names, in
``dense.safetensors``; and a manifest. Each lower precision the store keeps
(``executor.quantization``: half, int8, int4) is a *variant*: an experts file of its own,
laid out the same way, whose parts are that precision's tensors. ``ExpertStore`` reads experts
back with ``O_DIRECT`` where the file system allows it, so the OS page cache does not quietly
keep the model in RAM.

Damage is detected, not served: the manifest holds a CRC-32 per expert and one for the dense
file, and describes offsets that must agree with each other and with the file's size. A
store is checked when built (every expert read back), when opened (manifest, sizes, dense
file) and on every expert load (its CRC, ~0.27 ms per MiB on this machine's CPU: crc32 runs
at ~3.7 GB/s against 1-5 GB/s for the ``O_DIRECT`` read). A damaged expert found at load time
is a ``Corrupted`` error naming the file, layer and expert, and marks the store so the next
``ensure_store`` rebuilds it; a damaged manifest or dense file is rebuilt at once.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import os
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swapmoe.core.errors import Corrupted
from swapmoe.core.limits import is_fingerprint
from swapmoe.executor import quantization

ALIGN = 4096
FORMAT = 5  # 3: CRC-32 per expert and for the dense file; 4: the model fingerprint; 5: precision variants
DAMAGED = "DAMAGED"  # marker file: a load found damage; the next ensure_store rebuilds
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PartSpec:
    name: str
    shape: tuple[int, ...]
    nbytes: int
    dtype: str = ""  # "": the manifest's dtype

    def torch_dtype(self, default: str) -> torch.dtype:
        return getattr(torch, self.dtype or default)


@dataclass(frozen=True, slots=True)
class LayerSpec:
    module: str
    num_experts: int
    parts: tuple[PartSpec, ...]
    expert_bytes: int  # payload of one expert
    stride: int  # expert_bytes rounded up to ALIGN
    offset: int  # of expert 0 in the file
    norms: tuple[float, ...]  # ||E_i|| per expert (Frobenius, over all of the expert's weights)
    checksums: tuple[int, ...] = ()  # CRC-32 of each expert's payload

    def expert_offset(self, expert: int) -> int:
        return self.offset + expert * self.stride


@dataclass(frozen=True, slots=True)
class Variant:
    """The experts at one lower precision, in a file of their own laid out like the native one."""

    precision: str
    file: str
    layers: tuple[LayerSpec, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    architecture: str
    model_class: str
    dtype: str
    layers: tuple[LayerSpec, ...]
    dense_bytes: int = 0
    file: str = "experts.bin"
    dense_file: str = "dense.safetensors"
    format: int = FORMAT
    dense_checksum: int = 0  # CRC-32 of the dense file
    model_fingerprint: str = ""  # core.fingerprint of the checkpoint it was built from
    variants: tuple[Variant, ...] = ()
    int4_layout: str = ""  # quantization.int4_layout_tag of the machine that packed the int4 variant

    @property
    def precisions(self) -> tuple[str, ...]:
        """The checkpoint's dtype, then each variant's precision (most bytes first)."""
        return (self.dtype, *(v.precision for v in self.variants))

    def variant(self, precision: str | None) -> tuple[str, tuple[LayerSpec, ...]]:
        """(file, layers) of the experts at ``precision`` (None: the checkpoint's dtype); KeyError
        names the precisions this store has."""
        if precision in (None, "", self.dtype):
            return self.file, self.layers
        for v in self.variants:
            if v.precision == precision:
                return v.file, v.layers
        raise KeyError(f"precision {precision!r} is not in this store (it has {', '.join(self.precisions)})")

    def save(self, directory: Path) -> None:
        tmp = directory / ".manifest.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(directory / "manifest.json")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        """The manifest of the store in ``directory``; Corrupted when it is missing, unreadable or
        disagrees with itself or with the size of the experts file."""
        path = directory / "manifest.json"
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise Corrupted(f"{path}: expert store format {raw.get('format')} is not {FORMAT}")
            variants = tuple(Variant(v["precision"], v["file"], _layers(v["layers"])) for v in raw["variants"])
            manifest = cls(raw["architecture"], raw["model_class"], raw["dtype"], _layers(raw["layers"]),
                           raw["dense_bytes"], raw["file"], raw["dense_file"], raw["format"], raw["dense_checksum"],
                           raw["model_fingerprint"], variants, raw["int4_layout"])
            manifest.check(directory)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # AttributeError: not an object
            if isinstance(error, Corrupted):
                raise
            raise Corrupted(f"{path}: unreadable manifest ({type(error).__name__}: {error})") from error
        return manifest

    def check(self, directory: Path) -> None:
        """Corrupted unless each experts file is tiled by its layers in order, each expert aligned
        and described by its parts, norms and checksums, and the file has exactly those bytes."""
        path = directory / "manifest.json"
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise Corrupted(f"{path}: dtype {self.dtype!r} is not a torch dtype")
        if not (is_fingerprint(self.model_fingerprint) and len(self.model_fingerprint) == 16):
            raise Corrupted(f"{path}: model fingerprint {str(self.model_fingerprint)[:64]!r} is not 16 hex digits")
        for precision in self.precisions:
            file, layers = self.variant(precision)
            if Path(file).name != file or not file.endswith(".bin"):
                raise Corrupted(f"{path}: experts file {file[:64]!r} is not a file name in the store")
            self._check_layers(directory, file, layers)
        native = getattr(torch, self.dtype)
        for v in self.variants:  # each the checkpoint's layers, its parts those its precision makes of theirs
            want = [(l.module, l.num_experts, [(q.name, q.shape, quantization.name_of(q.dtype)) for p in l.parts
                                               for q in quantization.parts(p.name, p.shape, native, v.precision)])
                    for l in self.layers]
            if [(l.module, l.num_experts, [(p.name, p.shape, p.dtype) for p in l.parts]) for l in v.layers] != want:
                raise Corrupted(f"{path}: its {v.precision} experts do not match the checkpoint's layers")

    def _check_layers(self, directory: Path, file: str, layers: tuple[LayerSpec, ...]) -> None:
        path, end = directory / "manifest.json", 0
        for i, l in enumerate(layers):
            for p in l.parts:
                if not isinstance(getattr(torch, p.dtype or self.dtype, None), torch.dtype):
                    raise Corrupted(f"{path}: layers[{i}] ({l.module}) of {file}: part {p.name}'s dtype {p.dtype!r} "
                                    "is not a torch dtype")
            problems = [
                (l.num_experts < 1, f"{l.num_experts} experts"),
                *((math.prod(p.shape) * torch.empty((), dtype=p.torch_dtype(self.dtype)).element_size() != p.nbytes,
                   f"part {p.name} of shape {list(p.shape)} in {p.nbytes} bytes") for p in l.parts),
                (l.offset != end, f"offset {l.offset}, but layer {i - 1} ends at {end}" if i else
                 f"offset {l.offset}, but the first layer starts at 0"),
                (l.stride % ALIGN or l.stride < l.expert_bytes, f"stride {l.stride} for {l.expert_bytes}-byte experts"),
                (sum(p.nbytes for p in l.parts) != l.expert_bytes, f"parts of {sum(p.nbytes for p in l.parts)} bytes "
                                                                   f"in a {l.expert_bytes}-byte expert"),
                (not len(l.norms) == len(l.checksums) == l.num_experts, f"{len(l.norms)} norms and "
                 f"{len(l.checksums)} checksums for {l.num_experts} experts"),
            ]
            for bad, what in problems:
                if bad:
                    raise Corrupted(f"{path}: layers[{i}] ({l.module}) of {file}: {what}")
            end = l.offset + l.stride * l.num_experts
        size = (directory / file).stat().st_size if (directory / file).exists() else -1
        if size != end:
            raise Corrupted(f"{directory / file}: {size} bytes, but the manifest describes {end}")


def _layers(raw) -> tuple[LayerSpec, ...]:
    return tuple(LayerSpec(l["module"], l["num_experts"],
                           tuple(PartSpec(p["name"], tuple(p["shape"]), p["nbytes"], p["dtype"]) for p in l["parts"]),
                           l["expert_bytes"], l["stride"], l["offset"], tuple(l["norms"]), tuple(l["checksums"]))
                 for l in raw)


def part_views(raw: torch.Tensor, parts: tuple[PartSpec, ...], dtype: str) -> dict[str, torch.Tensor]:
    """Views of each part of an expert laid out in ``raw`` (uint8); ``dtype``: of parts naming none."""
    out, start = {}, 0
    for part in parts:
        out[part.name] = raw[start:start + part.nbytes].view(part.torch_dtype(dtype)).view(part.shape)
        start += part.nbytes
    return out


def file_crc(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def check_store(directory: Path) -> Manifest:
    """The store's manifest once its cheap checks pass (manifest, sizes, dense file's CRC, no
    damage marked by a load); Corrupted otherwise. Costs one read of the dense file."""
    directory = Path(directory)
    if (directory / DAMAGED).exists():
        raise Corrupted(f"{directory}: marked damaged: {(directory / DAMAGED).read_text().strip()}")
    manifest = Manifest.load(directory)
    if "int4" in manifest.precisions and manifest.int4_layout != quantization.int4_layout_tag():
        raise Corrupted(f"{directory}: its int4 experts are packed for another CPU's kernel layout "
                        f"({manifest.int4_layout}, this machine's is {quantization.int4_layout_tag()})")
    dense = directory / manifest.dense_file
    if not dense.exists() or file_crc(dense) != manifest.dense_checksum:
        raise Corrupted(f"{dense}: fails its checksum (the dense weights are damaged)")
    return manifest


def verify_store(directory: Path, manifest: Manifest | None = None) -> None:
    """Read every expert of every precision back and check its CRC (one pass over the experts
    files: ~1.5 GB/s here, so ~0.7 s per GB); Corrupted names the first damaged expert."""
    store = ExpertStore(directory, direct=False, manifest=manifest)
    try:
        for precision in store.manifest.precisions:
            for layer, spec in enumerate(store.manifest.variant(precision)[1]):
                buffer = store.buffer(layer, precision)
                for expert in range(spec.num_experts):
                    store.read_into(layer, expert, buffer, precision)
    finally:
        store.close()


def _identity(stat: os.stat_result) -> tuple[int, int]:
    """Which file this is: a rebuilt store has new files, and an open file's inode is never reused."""
    return stat.st_dev, stat.st_ino


class _ExpertsFile:
    """One experts file open for reading: ``O_DIRECT`` where the file system takes it."""

    def __init__(self, directory: Path, file: str, layers: tuple[LayerSpec, ...], direct: bool):
        self.path, self.layers, self.direct = directory / file, layers, direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        except OSError:  # e.g. tmpfs does not support O_DIRECT
            if not self.direct:
                raise
            self.fd, self.direct = os.open(self.path, os.O_RDONLY), False
        self.opened = _identity(os.fstat(self.fd))  # damage is marked only on the file this reader has open
        self._reopen = threading.Lock()

    def without_direct_io(self) -> None:
        with self._reopen:
            if self.direct:  # another thread may have switched already; the old descriptor stays open for it
                self.fd = os.open(self.path, os.O_RDONLY)
                self.direct = False

    def close(self) -> None:
        os.close(self.fd)


class ExpertStore:
    """Reads experts from an expert store; one ``pread`` per expert. ``precision`` (None: the
    checkpoint's dtype) picks which of the store's variants a read comes from."""

    def __init__(self, directory: Path, direct: bool = True, bandwidth: float | None = None,
                 manifest: Manifest | None = None):
        """``bandwidth`` (bytes/s) caps reads, shared by all readers: to leave a device's storage to
        its other users, or to stand in for a slower tier than this machine's (benchmarks)."""
        self.directory = Path(directory)
        self.bandwidth = bandwidth
        self._pace = threading.Lock()
        self._tier_free_at = 0.0
        self.manifest = manifest or Manifest.load(self.directory)
        self.dtype = getattr(torch, self.manifest.dtype)
        self._files = {p: _ExpertsFile(self.directory, *self.manifest.variant(p), direct)
                       for p in self.manifest.precisions}

    @property
    def direct(self) -> bool:
        return self._file(None).direct

    @property
    def tier(self) -> str:
        tier = "disk (O_DIRECT)" if self.direct else "disk (page cache dropped after reads)"
        return tier + (f", capped at {self.bandwidth / 2**20:.0f} MiB/s" if self.bandwidth else "")

    def without_direct_io(self) -> None:
        """Read through the page cache from now on (as a file system that refuses O_DIRECT makes it)."""
        for file in self._files.values():
            file.without_direct_io()

    def _file(self, precision: str | None) -> _ExpertsFile:
        file = self._files.get(precision or self.manifest.dtype)
        if file is None:
            self.manifest.variant(precision)  # the KeyError naming what the store has
        return file

    def spec(self, layer: int, precision: str | None = None) -> LayerSpec:
        return self._file(precision).layers[layer]

    def buffer(self, layer: int, precision: str | None = None) -> mmap.mmap:  # page-aligned, for O_DIRECT
        return self.buffer_of(self.spec(layer, precision).stride)

    @property
    def max_stride(self) -> int:
        """The largest expert of any layer at any precision, padded: what one buffer must hold."""
        return max(l.stride for f in self._files.values() for l in f.layers)

    buffer_of = staticmethod(lambda nbytes: mmap.mmap(-1, nbytes))

    def read_into(self, layer: int, expert: int, buffer: mmap.mmap, precision: str | None = None) -> int:
        """Read one expert into ``buffer``; returns the bytes read."""
        return self._read(layer, expert, [memoryview(buffer)[:self.spec(layer, precision).stride]], precision)

    def can_read_into(self, layer: int, targets: dict[str, torch.Tensor], precision: str | None = None) -> bool:
        """Whether ``read_into_tensors`` can fill these tensors straight from disk: CPU tensors,
        contiguous, page-aligned, one per part, each a whole number of pages (for O_DIRECT)."""
        parts = self.spec(layer, precision).parts
        return (self._file(precision).direct and [p.name for p in parts] == list(targets)
                and all(t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() % ALIGN == 0
                        and t.numel() * t.element_size() == p.nbytes and p.nbytes % ALIGN == 0
                        for p, t in zip(parts, targets.values())))

    def read_into_tensors(self, layer: int, expert: int, targets: dict[str, torch.Tensor],
                          precision: str | None = None) -> int:
        """Read one expert straight into its runtime tensors (one ``preadv``, no staging copy)."""
        views = [memoryview(t.detach().view(torch.uint8).reshape(-1).numpy()) for t in targets.values()]
        return self._read(layer, expert, views, precision)

    def _read(self, layer: int, expert: int, views: list[memoryview], precision: str | None) -> int:
        file = self._file(precision)
        spec = file.layers[layer]
        if not 0 <= expert < spec.num_experts:
            raise IndexError(f"layer {layer} has no expert {expert}")
        offset = spec.expert_offset(expert)
        done_by = self._reserve(spec.expert_bytes)
        try:
            done = os.preadv(file.fd, views, offset)
        except OSError as error:
            if not (file.direct and error.errno == errno.EINVAL):
                raise
            file.without_direct_io()  # the file system took O_DIRECT at open but not for reads
            done = os.preadv(file.fd, views, offset)
        if done < spec.expert_bytes:
            raise OSError(f"short read of expert ({layer}, {expert}): {done} of {spec.expert_bytes} bytes")
        self._check(file, layer, expert, views)
        if not file.direct:
            os.posix_fadvise(file.fd, offset, spec.stride, os.POSIX_FADV_DONTNEED)
        if done_by > (now := time.monotonic()):
            time.sleep(done_by - now)
        return spec.expert_bytes

    def _check(self, file: _ExpertsFile, layer: int, expert: int, views: list[memoryview]) -> None:
        """Corrupted, and the store marked for a rebuild, when the bytes read fail the expert's CRC."""
        spec = file.layers[layer]
        crc, left = 0, spec.expert_bytes
        for view in views:
            chunk = view.cast("B")[:left]
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        if crc == spec.checksums[expert]:
            return
        problem = (f"{file.path}: expert {expert} of layer {layer} ({spec.module}) fails its checksum "
                   f"(CRC-32 {crc:08x}, manifest {spec.checksums[expert]:08x}) at offset {spec.expert_offset(expert)}")
        log.error("%s; the store is marked damaged and is rebuilt at the next start", problem)
        try:
            if _identity(os.stat(file.path)) == file.opened:  # not repaired meanwhile
                (self.directory / DAMAGED).write_text(problem + "\n")
        except OSError:
            pass  # a read-only store: the error still names the damage
        raise Corrupted(problem + "; the next start of the executor rebuilds the store")

    def _reserve(self, nbytes: int) -> float:
        """When a read of ``nbytes`` may finish under the bandwidth cap (0: no cap)."""
        if not self.bandwidth:
            return 0.0
        with self._pace:
            start = max(time.monotonic(), self._tier_free_at)
            self._tier_free_at = start + nbytes / self.bandwidth
            return self._tier_free_at

    def tensors(self, layer: int, buffer: mmap.mmap, precision: str | None = None) -> dict[str, torch.Tensor]:
        """Views of the expert in ``buffer`` as its runtime tensors (no copy)."""
        count = self.spec(layer, precision).expert_bytes
        return self.tensors_from(layer, torch.frombuffer(buffer, dtype=torch.uint8, count=count), precision)

    def tensors_from(self, layer: int, raw: torch.Tensor, precision: str | None = None) -> dict[str, torch.Tensor]:
        """Views of an expert laid out in the uint8 tensor ``raw`` (e.g. a pinned staging buffer)."""
        return part_views(raw, self.spec(layer, precision).parts, self.manifest.dtype)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
