"""A memory cap for a benchmark's child process: a cgroup v1 memory controller child (cgroup v2
is not writable on these machines; see /work/shared/notes/peers.md). The child writes its pid
into ``cgroup.procs`` before it reads its model, so the cgroup is charged for all of it."""

from __future__ import annotations

import os
import time
from pathlib import Path

MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")


def join(group: Path | str) -> None:
    """Move the calling process into ``group`` (in the child, before it reads anything large)."""
    if group:
        Path(group, "cgroup.procs").write_text(str(os.getpid()))


def make(limit: int) -> Path:
    """A new child of this process's own v1 memory cgroup, limited to ``limit`` bytes; OSError where
    none can be made (no v1 memory controller, or not writable)."""
    own = [line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
           if line.split(":", 2)[1] == "memory"]
    if not own:
        raise OSError("no cgroup v1 memory controller in /proc/self/cgroup")
    group = MEMORY_CGROUPS / own[0].lstrip("/") / f"swapmoe-bench-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        group.rmdir()
        raise
    return group


def remove(group: Path) -> None:
    """Remove ``group`` once its last process has left it."""
    deadline = time.monotonic() + 5  # an exited child may still count in the cgroup a moment after wait()
    while group.exists():
        try:
            group.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def evict(path: Path) -> None:
    """Drops the file's pages (those no process maps) from the page cache: its next reader is charged."""
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
