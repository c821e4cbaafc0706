"""A model's identity for profiles: a hash of what it computes, stable across copies.

The expert store's own fingerprint uses file sizes and times (cheap, for a cache on one
machine); a profile moves between machines, so it hashes the bytes of the config and weights.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_CHUNK = 1 << 22


def model_fingerprint(checkpoint: Path) -> str:
    """SHA-256 (first 16 hex digits) of ``config.json`` and every safetensors file, by content."""
    checkpoint = Path(checkpoint).resolve()
    files = [checkpoint / "config.json"] + sorted(checkpoint.glob("*.safetensors"))
    return _digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@lru_cache(maxsize=16)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """Cached per (path, size, mtime): a checkpoint is hashed once per process."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        path = Path(name)
        digest.update(f"{path.name}\n".encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]
