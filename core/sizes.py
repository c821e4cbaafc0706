"""Memory sizes as users write them: ``512MiB``, ``2GiB``, ``1.5GB``, ``1048576``."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
    "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``; SI units (kB, MB, GB) are powers of 1000, IEC (KiB, MiB, GiB) of 1024.

    Raises ValueError with the accepted forms when the text is malformed.
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(
            f"malformed size {text!r}: expected a number with an optional unit "
            "B, kB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 512MiB, 2GiB, 1.5GB)"
        )
    size = float(match.group(1)) * _UNITS[unit]
    if size < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(size)


def format_size(num_bytes: int) -> str:
    """Short human-readable form in IEC units, e.g. ``1.5 MiB``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
