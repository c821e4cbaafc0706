"""A model's identity for profiles: a hash of what it computes, stable across copies.

The expert store's own directory name uses file sizes and times (cheap, for a cache on one
machine); a profile moves between machines, so it hashes the bytes of the config and weights.
That costs a read of the whole checkpoint (about 15 s per 14 GB here), so it is done once,
while the expert store is built, and kept in the store's manifest: a start reads it there.
"""

from __future__ import annotations

import hashlib
import os
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
    """Cached per (path, size, mtime): a checkpoint is hashed once per process. The pages read
    are dropped from the page cache behind the hash (a checkpoint may be larger than memory)."""
    digest = hashlib.sha256()
    for name, _, _ in files:
        path = Path(name)
        digest.update(f"{path.name}\n".encode())
        with path.open("rb", buffering=0) as f:
            offset = 0
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                os.posix_fadvise(f.fileno(), offset, len(chunk), os.POSIX_FADV_DONTNEED)
                offset += len(chunk)
    return digest.hexdigest()[:16]
