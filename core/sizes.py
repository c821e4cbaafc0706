"""Memory sizes as users write them: ``512MiB``, ``2Gi``, ``1.5GB``, ``800M``, ``1048576``."""

from __future__ import annotations

import re

# Units are case-insensitive. SI units and Kubernetes' decimal suffixes (k, M, G, T, P) are powers of
# 1000; IEC units and Kubernetes' binary suffixes (Ki, Mi, Gi, Ti, Pi) powers of 1024.
_UNITS = {
    "": 1, "b": 1,
    **{f"{letter}{b}": 1000**power for power, letter in enumerate("kmgtp", start=1) for b in ("", "b")},
    **{f"{letter}i{b}": 1024**power for power, letter in enumerate("kmgtp", start=1) for b in ("", "b")},
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
ACCEPTED = ("a number of bytes with an optional unit: kB, MB, GB, TB, PB or k, M, G, T, P (powers of 1000); "
            "KiB, MiB, GiB, TiB, PiB or Ki, Mi, Gi, Ti, Pi (powers of 1024); e.g. 512MiB, 2Gi, 1.5GB")


def parse_size(text: str) -> int:
    """Bytes in ``text``. Raises ValueError listing the accepted spellings when it is malformed."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"malformed size {text!r}: expected {ACCEPTED}")
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
