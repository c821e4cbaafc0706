"""Experts kept at a lower precision than the checkpoint's: half, and weight-only int8 and int4.

An expert's weights ([N, K] matrices: out-features by in-features) are stored per precision as
*parts*, plain tensors the store reads in one aligned read and the slots hold as they are:

- ``bfloat16`` / ``float16``: the weight cast (only offered for a float32 checkpoint);
- ``int8``: symmetric per output row, ``w = q * scale`` (``scale`` [N]);
- ``int4``: asymmetric per group of ``G`` in-features, ``w = (q - 8) * scale + zero``, ``q`` packed
  into the layout of torch's CPU kernel, ``scales`` [K/G, N, 2] holding (scale, zero).

Scales are kept in bfloat16, and the kernels run with activations in ``COMPUTE`` (bfloat16):
measured here, their float32 paths are 15-35x slower (int4 1024->4608, one token: 0.30 ms in
bfloat16, 10.9 ms in float32, against 0.78 ms for the float32 matmul). In any dtype a kernel
computes what its dequantized weight would (``reference`` computes that weight from the
checkpoint's, apart from the kernels' layouts); the tests hold the kernels to it with float32
activations, where the comparison is exact. The kernels are the weight-only matmuls that ship
in torch itself (``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``, as gpt-fast uses
them): no extra dependency, and int4 is the fastest expert matmul on this CPU at about an
eighth of fp32's bytes. Vectors (biases) stay in the checkpoint's dtype. The int4 layout
is the kernel's, which may differ between CPUs: ``int4_layout_tag`` names it, and a store
built for another layout is rebuilt rather than misread.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch
from torch.nn import functional as F

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE = torch.bfloat16  # activations of the int8 and int4 kernels (and the dtype of their scales)
QUANTIZED = ("int8", "int4")
SCALES = "_scales"  # suffix of a weight's scales part
INT4_GROUPS = (64, 32)  # in-features per int4 group, the first that divides K


@dataclass(frozen=True, slots=True)
class PartShape:
    """One stored tensor of an expert at some precision."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def offered(native: torch.dtype) -> tuple[str, ...]:
    """Precisions a store keeps beside the checkpoint's own, most bytes first: half for a float32
    checkpoint, then int8, then int4."""
    half = ("bfloat16",) if native == torch.float32 else ()
    return (*half, "int8", "int4")


def runs_on(precision: str, device: torch.device) -> bool:
    """Whether experts at ``precision`` compute on ``device``: the int8 and int4 kernels used here
    are torch's CPU ones."""
    return device.type == "cpu" or precision not in QUANTIZED


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def int4_group(k: int) -> int:
    """In-features per int4 group for a weight with ``k`` in-features; 0 when none divides it."""
    return next((g for g in INT4_GROUPS if k % g == 0), 0)


def parts(name: str, shape: tuple[int, ...], native: torch.dtype, precision: str) -> tuple[PartShape, ...]:
    """The stored tensors of the part ``name`` (shape ``shape`` in ``native``) at ``precision``;
    ValueError when that precision cannot hold it (int4 needs in-features in whole groups)."""
    if len(shape) != 2 or precision == name_of(native):
        return (PartShape(name, shape, native),)
    n, k = shape
    if precision in HALF:
        return (PartShape(name, shape, HALF[precision]),)
    if precision == "int8":
        return PartShape(name, shape, torch.int8), PartShape(name + SCALES, (n,), COMPUTE)
    if precision == "int4":
        group = int4_group(k)
        if not group or n % 16:
            raise ValueError(f"{name} is {n} x {k}: int4 needs in-features in whole groups of {INT4_GROUPS[-1]} "
                             "and out-features in multiples of 16")
        return PartShape(name, (n, k // 2), torch.uint8), PartShape(name + SCALES, (k // group, n, 2), COMPUTE)
    raise ValueError(f"unknown precision {precision!r}")


def quantize(weight: torch.Tensor, precision: str) -> list[torch.Tensor]:
    """``weight`` [N, K] at ``precision``, as its parts (``parts`` order); vectors pass through."""
    native = weight.dtype
    if weight.dim() != 2 or precision == name_of(native):
        return [weight]
    if precision in HALF:
        return [weight.to(HALF[precision])]
    if precision == "int8":
        q, scale = _int8_codes(weight)
        return [q.to(torch.int8), scale.to(COMPUTE)]
    if precision == "int4":
        q, scale, zero = _int4_codes(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(weight.shape).to(torch.int32), 1)
        return [packed, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(COMPUTE)]
    raise ValueError(f"unknown precision {precision!r}")


def reference(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """The float32 weight that ``weight`` at ``precision`` stands for, computed without the
    kernels' layouts: what the tests hold the kernels to."""
    if weight.dim() != 2 or precision == name_of(weight.dtype):
        return weight.float()
    if precision in HALF:
        return weight.to(HALF[precision]).float()
    if precision == "int8":
        q, scale = _int8_codes(weight)
        return q * scale[:, None]
    q, scale, zero = _int4_codes(weight)
    return ((q - 8) * scale[..., None] + zero[..., None]).reshape(weight.shape)


def _int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in -127..127 (float) and the per-row scale as stored."""
    w = weight.float()
    scale = _stored(w.abs().amax(dim=1) / 127)
    return (w / scale[:, None]).round().clamp(-127, 127), scale


def _int4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes in 0..15 [N, K/G, G] (float), and scale and zero [N, K/G] as stored (min-max per group)."""
    n, k = weight.shape
    group = int4_group(k)
    grouped = weight.float().reshape(n, k // group, group)
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = _stored((high - low) / 15)
    zero = (low + 8 * scale).to(COMPUTE).float()
    return ((grouped - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15), scale, zero


def _stored(scale: torch.Tensor) -> torch.Tensor:
    """Scales as they will be stored (in ``COMPUTE``), never zero (a constant row or group)."""
    scale = scale.to(COMPUTE).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def linear(x: torch.Tensor, stored: list[torch.Tensor], precision: str,
           compute: torch.dtype = COMPUTE) -> torch.Tensor:
    """``x @ W.T`` for ``W`` held as ``stored`` at ``precision``, with activations in ``compute``
    (int8, int4; half weights compute in their own dtype), returned in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(activations(precision, compute, stored)).contiguous()
    out = matmul(flat, stored, precision)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def activations(precision: str, compute: torch.dtype, stored: list[torch.Tensor]) -> torch.dtype:
    """The dtype a weight held at ``precision`` takes its activations in."""
    return compute if precision in QUANTIZED else stored[0].dtype


def matmul(flat: torch.Tensor, stored: list[torch.Tensor], precision: str) -> torch.Tensor:
    """``flat @ W.T`` for ``flat`` [M, K] already in ``activations``' dtype; the same dtype out."""
    if precision == "int4":
        packed, scales = stored
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, flat.shape[-1] // scales.shape[0],
                                                          scales.to(flat.dtype).contiguous())  # views: fused_qkv
    if precision == "int8":
        q, scale = stored
        return torch.ops.aten._weight_int8pack_mm(flat, q, scale.to(flat.dtype))
    return F.linear(flat, stored[0])


@functools.lru_cache(maxsize=None)
def int4_rows_concatenate(rows: tuple[int, ...]) -> bool:
    """Whether int4 weights of ``rows`` out-features each, packed one by one, concatenate into the
    packing of their concatenation: the CPU kernel packs blocks of rows (64 here), so only weights
    whose rows fill whole blocks do (a probe, as ``int4_layout_tag``)."""
    probes = [(torch.arange(n * 64, dtype=torch.int32).reshape(n, 64) * (7 + 2 * i) + i) % 16
              for i, n in enumerate(rows)]
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    return torch.equal(pack(torch.cat(probes), 1), torch.cat([pack(p, 1) for p in probes]))


def int4_layout_tag() -> str:
    """Names the CPU int4 kernel's packed layout on this machine (a CRC of a packed probe)."""
    probe = (torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64) * 7 + 3) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    return f"{zlib.crc32(packed.contiguous().numpy().tobytes()):08x}"
