"""Writing a file so that a reader, a crash or a full disk never leaves half of one.

Every store of the project (the planner's records, the executor's plan and node secret, the
control node's rollouts, profiles) writes through ``write_atomically``: the bytes go to a
temporary file beside the target, which then replaces it in one rename. A write that fails
(ENOSPC, a read-only directory) removes its temporary file and raises; the previous file is
untouched.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode`` from its first byte on), or raise OSError
    leaving ``path`` as it was and no temporary file behind. ``sync``: the data and the rename reach
    the disk before this returns, so a power cut leaves the old file or the new one, never an
    empty one (a node secret lost that way would lock its executor out)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # a file left by an earlier process keeps its old mode otherwise
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries (a rename is durable once its directory is) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
