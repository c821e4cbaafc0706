"""Short garbage-collector pauses for a planner that holds 10,000 streams.

CPython's full collections walk every tracked object with the interpreter held: at 10,000
executors that is ~1 M objects (gRPC's per-stream coroutines, futures and callbacks, about
100 per executor) and 0.6-0.7 s during which no stream, control call or health check is
answered; they come every time the heap grows by a quarter, so a registration storm has
about ten of them. Every second, what has survived so far moves to the permanent
generation (``gc.freeze``, O(1)), so collections only walk the objects of the last second.

Frozen objects are still freed by reference counting; only cycles that form among them
would wait. A fleet's traffic makes none (2,000 executors registering, reporting and
leaving left 0 objects for a full collection: benchmarks/results/RESULTS-fleet.md), and every
``full_every_s`` the heap thaws and one full collection runs, logged with what it found.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeapSettings:
    freeze_every_s: float = 1.0
    full_every_s: float = 6 * 3600.0


class HeapKeeper:
    """Freezes survivors every ``freeze_every_s`` on a daemon thread, thaws and collects every
    ``full_every_s``; ``stop`` thaws the heap."""

    def __init__(self, settings: HeapSettings = HeapSettings()):
        self.settings = settings
        self.full_collections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heap-keeper")

    def start(self) -> "HeapKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        gc.unfreeze()

    def full_collection(self) -> int:
        """Thaw, collect everything, and return the unreachable objects found."""
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        self.full_collections += 1
        log.info("full garbage collection: %d unreachable objects, %.0f ms", found,
                 (time.perf_counter() - started) * 1000)
        return found

    def _run(self) -> None:
        last_full = time.monotonic()
        while not self._stop.wait(self.settings.freeze_every_s):
            if time.monotonic() - last_full >= self.settings.full_every_s:
                self.full_collection()
                last_full = time.monotonic()
            gc.freeze()
