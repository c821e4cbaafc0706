"""Expert loads from the store into slots, on a background thread (paper section 3.2).

A load reads one expert from disk (``O_DIRECT``: the page cache does not keep it) into a
staging buffer, then copies it into its reserved slot. On CUDA the staging buffer is pinned
and the copy runs on a side stream; the thread waits for the copy's event, so a load is
reported finished only once its slot is completely written. Finished loads are collected by
the runtime between forward passes, which is when a slot becomes visible to routing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from swapmoe.executor.store import ExpertStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Load:
    layer: int
    expert: int
    slot: int
    targets: dict[str, torch.Tensor]  # the slot's tensors, by store part name
    nbytes: int = 0
    seconds: float = 0.0
    error: BaseException | None = None  # set when the load failed: its slot holds no expert
    precision: str = ""  # of the slot's tensors ("": the checkpoint's): which store variant is read


@dataclass(frozen=True, slots=True)
class LoadCounters:
    """Cumulative expert I/O at one moment; readers subtract two for what happened between."""

    loads: int = 0
    nbytes: int = 0
    seconds: float = 0.0

    def __sub__(self, earlier: "LoadCounters") -> "LoadCounters":
        return LoadCounters(self.loads - earlier.loads, self.nbytes - earlier.nbytes, self.seconds - earlier.seconds)


class LoadStats:
    """Cumulative expert I/O (background and synchronous loads); thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = LoadCounters()

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            c = self._counters
            self._counters = LoadCounters(c.loads + 1, c.nbytes + nbytes, c.seconds + seconds)

    def snapshot(self) -> LoadCounters:
        with self._lock:
            return self._counters


class Copier:
    """Reads an expert from the store and writes it into slot tensors (one staging buffer)."""

    def __init__(self, store: ExpertStore, device: torch.device, stats: LoadStats):
        self.store = store
        self.stats = stats
        stride = store.max_stride
        self.buffer = store.buffer_of(stride)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.pinned = torch.empty(stride, dtype=torch.uint8, pin_memory=True)
            self.stream = torch.cuda.Stream(device)
        self.staging_bytes = stride * (2 if self.cuda else 1)

    def copy(self, layer: int, expert: int, targets: dict[str, torch.Tensor], precision: str = "") -> int:
        """Load one expert into ``targets``, from the store's variant at ``precision``; returns the bytes read."""
        start = time.perf_counter()
        nbytes = self._copy(layer, expert, targets, precision)
        self.stats.add(nbytes, time.perf_counter() - start)
        return nbytes

    def _copy(self, layer: int, expert: int, targets: dict[str, torch.Tensor], precision: str) -> int:
        if self.store.can_read_into(layer, targets, precision):  # disk -> slot by DMA: no CPU copy at all
            return self.store.read_into_tensors(layer, expert, targets, precision)
        nbytes = self.store.read_into(layer, expert, self.buffer, precision)
        sources = self.store.tensors(layer, self.buffer, precision)
        with torch.no_grad():
            if not self.cuda:
                for name, target in targets.items():
                    target.copy_(sources[name])
                return nbytes
            self.pinned[:nbytes].copy_(torch.frombuffer(self.buffer, dtype=torch.uint8, count=nbytes))
            pinned = self.store.tensors_from(layer, self.pinned, precision)
            # The slot may have been read by kernels still queued on the compute stream.
            self.stream.wait_stream(torch.cuda.current_stream(next(iter(targets.values())).device))
            with torch.cuda.stream(self.stream):
                for name, target in targets.items():
                    target.copy_(pinned[name], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            done.synchronize()  # the slot is whole before anyone hears of it; the staging buffer is free again
        return nbytes


class ExpertLoader:
    """One background thread serving a queue of loads; the caller collects finished ones."""

    def __init__(self, store: ExpertStore, device: torch.device, stats: LoadStats,
                 on_finished: Callable[[], None] = lambda: None):
        self._copier = Copier(store, device, stats)
        self._on_finished = on_finished  # called on the loader's thread, before it counts as idle
        self.staging_bytes = self._copier.staging_bytes
        self._queue: deque[Load] = deque()
        self._finished: list[Load] = []
        self._busy = False
        self._current: Load | None = None  # the load being copied
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="expert-loader", daemon=True)
        self._thread.start()

    def submit(self, load: Load) -> None:
        with self._cond:
            self._queue.append(load)
            self._cond.notify_all()

    def cancel(self, load: Load) -> bool:
        """Take ``load`` off the queue if it has not started: True when it was (it never runs, its
        slot was never written, and it is never reported finished); False when it is being copied,
        has finished or was never queued (a copy under way cannot be stopped)."""
        with self._cond:
            for i, queued in enumerate(self._queue):
                if queued is load:
                    del self._queue[i]
                    self._cond.notify_all()  # ``wait_for`` and ``wait_idle`` callers look again
                    return True
        return False

    def finished(self) -> list[Load]:
        """Loads completed since the last call (their slots are fully written)."""
        with self._cond:
            done, self._finished = self._finished, []
        return done

    def quiesce(self) -> list[Load]:
        """Drop queued loads and wait for the one in flight; returns the dropped ones."""
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            while self._busy:
                self._cond.wait()
        return dropped

    def wait_for(self, load: Load, timeout: float | None = None) -> bool:
        """Block until ``load`` is neither queued nor being copied (finished, failed or dropped)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._current is not load and all(q is not load for q in self._queue),
                                       timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                load = self._current = self._queue.popleft()
                self._busy = True
            try:
                start = time.perf_counter()
                load.nbytes = self._copier.copy(load.layer, load.expert, load.targets, load.precision)
                load.seconds = time.perf_counter() - start
            except Exception as error:  # reported with the load; the thread serves on
                log.warning("loading expert %d of layer %d failed: %s", load.expert, load.layer, error)
                load.error = error
            finally:
                with self._cond:
                    self._finished.append(load)
                self._on_finished()
                with self._cond:
                    self._busy = False
                    self._current = None
                    self._cond.notify_all()
