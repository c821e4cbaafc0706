"""Safetensors files read and written one tensor at a time, outside the process's memory map.

``safetensors.safe_open`` maps the whole file: every page a read touches counts in the
process's resident set until the file is closed, so reading a 14 GiB checkpoint through it
once, tensor by tensor, peaks at 14 GiB of RSS (measured: 5.7 GiB for a 4.9 GiB checkpoint).
Here a tensor is one ``pread`` into memory of its own, and the pages it came through are
dropped from the page cache; the writer streams tensors in the format's layout (an 8-byte
header length, a JSON header, then the tensors back to back), so neither side ever holds
more than one tensor. The format is the one ``safetensors`` documents; what is written here is
read back by ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 << 20  # the format's own limit


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """One safetensors file: its tensors' specs, and each tensor read on its own."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if size > MAX_HEADER:
                raise ValueError(f"{self.path}: a header of {size} bytes is not a safetensors file's")
            header = json.loads(os.pread(self._fd, size, 8))
            self._base = 8 + size
            self.specs: dict[str, TensorSpec] = {}
            self._where: dict[str, tuple[int, int]] = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                self.specs[name] = TensorSpec(DTYPES[entry["dtype"]], tuple(entry["shape"]))
                self._where[name] = (begin, end)
                if end - begin != self.specs[name].nbytes:
                    raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes for its shape")
        except (struct.error, ValueError, KeyError, TypeError) as error:
            os.close(self._fd)
            raise ValueError(f"{self.path} is not a readable safetensors file: {error}") from error

    def get(self, name: str) -> torch.Tensor:
        """A copy of tensor ``name`` in memory of its own."""
        spec = self.specs[name]
        out = torch.empty(spec.nbytes, dtype=torch.uint8)
        self.read_into(name, memoryview(out.numpy()))
        return out.view(spec.dtype).reshape(spec.shape)

    def read_into(self, name: str, view: memoryview) -> None:
        """Tensor ``name``'s bytes into ``view`` (exactly its size); the pages it was read through
        are dropped from the page cache."""
        begin, end = self._where[name]
        if len(view) != end - begin:
            raise ValueError(f"{self.path}: tensor {name!r} has {end - begin} bytes, not {len(view)}")
        offset, done = self._base + begin, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(f"{self.path}: tensor {name!r} is cut short ({done} of {len(view)} bytes)")
            done += n
        os.posix_fadvise(self._fd, offset, end - begin, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self._fd)


class SafetensorsWriter:
    """Writes the tensors of ``specs``, in that order, one ``write`` call each; ``close`` syncs."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec]):
        self.path = Path(path)
        header, offset = {}, 0
        for name, spec in specs.items():
            header[name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
        self._pending = list(specs.items())
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, spec = self._pending.pop(0)
        if name != expected or (tensor.dtype, tuple(tensor.shape)) != (spec.dtype, spec.shape):
            raise ValueError(f"{self.path}: got {name!r} {tensor.dtype} {list(tensor.shape)}, expected "
                             f"{expected!r} {spec.dtype} {list(spec.shape)}")
        self._file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
