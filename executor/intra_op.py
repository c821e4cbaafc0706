"""The forward pass's torch intra-op threads: how many, chosen by measurement.

A thread more speeds a pass up only while a core is free for it, and the forward pass shares the
cores with gRPC, telemetry and above all expert loads (the loader thread reads an expert, checks
it and copies it into its slot while passes run). So the count is measured, not assumed: a decode
pass of the served model at each count with an expert load running beside it (``loads_beside``;
the measurement is ``device_profiling.measure_threads``), and the fewest threads within noise of
the fastest win (``choose_threads``): a thread that does not speed the pass up is left to the
loads and the RPCs.

Which count an executor runs (``IntraOpThreads.start``): ``--threads N`` when given; else the
count its last device profile chose, kept in its state directory (``FILE``) for this model,
device and set of cores; else a short probe at start-up (a few decode passes per count). Torch
keeps the count per calling thread (its OpenMP team and MKL's are thread-local), so it is set
on the thread that runs the passes: the engine's forward thread, or the thread that measures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from swapmoe.core.device_profile import DeviceProfile, ThreadPoint
from swapmoe.executor.loader import Copier, LoadStats

FILE = "threads.json"  # the last device profile's choice, in the state directory
THREADS_TOLERANCE = 0.05  # a count within 5% of the fastest (or its own noise) is as fast
EVERY_COUNT_UP_TO = 8  # counts measured one by one; beyond, powers of two and the last two
log = logging.getLogger(__name__)

PROBE_ROUNDS, PROBE_PASSES = 3, 2  # the start-up probe: rounds of a prefill, a warm-up and 2 timed passes per count


# --- the choice (pure) ------------------------------------------------------------------------
def thread_counts(cores: int) -> tuple[int, ...]:
    """The counts worth measuring on ``cores`` cores: each up to 8, then powers of two, and all
    cores but one and all of them (the usual fixed choices)."""
    counts = set(range(1, min(cores, EVERY_COUNT_UP_TO) + 1))
    power = EVERY_COUNT_UP_TO
    while power * 2 < cores:
        power *= 2
        counts.add(power)
    return tuple(sorted(counts | {max(1, cores - 1), max(1, cores)}))


def choose_threads(points: Sequence[ThreadPoint], tolerance: float = THREADS_TOLERANCE) -> int:
    """The fewest threads whose decode pass is within ``tolerance`` (relative) of the fastest
    count's; 0 with nothing measured."""
    measured = [p for p in points if p.threads > 0 and p.step_ns > 0]
    if not measured:
        return 0
    fastest = min(p.step_ns for p in measured)
    return min(p.threads for p in measured if p.step_ns <= fastest * (1 + tolerance))


def describe_points(points: Sequence[ThreadPoint]) -> str:
    """E.g. "1: 40.1 ms, 2: 25.3 ms per decode pass with an expert load beside"."""
    return (", ".join(f"{p.threads}: {p.step_ns / 1e6:.1f} ms" for p in sorted(points, key=lambda p: p.threads))
            + " per decode pass with an expert load beside")


# --- a load beside the passes -------------------------------------------------------------------
@contextlib.contextmanager
def loads_beside(runtime) -> Iterator[LoadStats]:
    """While the block runs, a thread of its own loads one expert after another through the
    loader's own copy (``loader.Copier``: the store's read under its bandwidth cap, the checksum,
    the copy into slot-shaped tensors, the pinned copy on an accelerator): what serving's loader
    thread does while updates load. It writes a scratch expert (one expert of ``runtime``'s
    largest, for the block's length), never a slot, and counts in a ``LoadStats`` of its own (yielded):
    the runtime's I/O counters stay those of its own loads."""
    store, device, stats = runtime.store, runtime.device, LoadStats()
    layer = max(range(len(store.manifest.layers)), key=lambda i: store.manifest.layers[i].expert_bytes)
    copier = Copier(store, device, stats)
    buffer = store.buffer(layer)
    scratch = store.tensors(layer, buffer)
    targets = scratch if device.type == "cpu" else {name: torch.empty_like(t, device=device)
                                                    for name, t in scratch.items()}
    stop = threading.Event()

    def load() -> None:
        try:
            for expert in itertools.cycle(range(store.manifest.layers[layer].num_experts)):
                if stop.is_set():
                    return
                copier.copy(layer, expert, targets)
        except Exception as error:  # a damaged store: the measurement goes on without loads
            log.warning("the load beside the thread measurement stopped: %s", error)

    thread = threading.Thread(target=load, daemon=True, name="threads-load-beside")
    thread.start()
    try:
        yield stats
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch ops on the calling thread with one intra-op thread, for the work an executor does off
    its forward thread (building the store, loading and lowering the dense weights). OpenMP keeps a
    team of workers per thread that ever ran a parallel region, and once it manages more workers
    than there are cores it lets them spin only briefly before sleeping, so every kernel of the
    forward pass then waits for its workers to wake. Measured on issue 30's Mixtral with int4 dense
    weights lowered on the main thread: 38 tokens/s, against 63 with them lowered single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- which count an executor runs -------------------------------------------------------------------
def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True, slots=True)
class ThreadSetting:
    """The intra-op threads the forward pass runs, and why (said at start and by Describe)."""

    threads: int
    reason: str

    def apply(self) -> None:
        """Run passes on the calling thread with this many threads."""
        torch.set_num_threads(self.threads)


@dataclass(frozen=True, slots=True)
class ThreadKey:
    """What a choice was measured for: it holds for the same model on the same device and cores."""

    model_fingerprint: str
    device: str
    cores: int


class IntraOpThreads:
    """The intra-op threads of one engine: chosen at start, chosen again by each device profile
    (unless ``requested``, an explicit ``--threads``, fixes them)."""

    def __init__(self, requested: int, state_dir: Path | None, model_fingerprint: str, device: str):
        self.requested, self.state_dir = requested, state_dir
        self.key = ThreadKey(model_fingerprint, device, usable_cores())
        self.setting = ThreadSetting(requested, f"{_threads(requested)}: --threads {requested}")

    def start(self, measure: Callable, runtime) -> ThreadSetting:
        """The setting to start with, applied on the calling thread: ``--threads``, the saved choice,
        or a probe of ``runtime`` with ``measure`` (``device_profiling.measure_threads``) at the counts
        of ``thread_counts``, a few passes each."""
        if not self.requested:
            saved, missing = self._saved()
            self.setting = saved or self._probe(measure, runtime, missing)
        self.setting.apply()
        log.info("%s", self.setting.reason)
        return self.setting

    def adopting(self, progress: Iterator, keep: Callable[[str, str], None],
                 on_forward_thread: Callable[[Callable[[], None]], None]) -> Iterator:
        """``progress`` (a device profile's ``ProfileProgress``), adopting the result's choice
        before passing the result on."""
        for step in progress:
            if step.result is not None:
                self.adopt(step.result, keep, on_forward_thread)
            yield step

    def adopt(self, profile: DeviceProfile, keep: Callable[[str, str], None],
              on_forward_thread: Callable[[Callable[[], None]], None]) -> None:
        """Keep ``profile``'s choice for the next start (``keep(FILE, text)``); without
        ``--threads``, the forward thread runs it from now on."""
        if not profile.threads:
            return
        keep(FILE, choice_json(self.key, profile.threads, profile.thread_points))
        if not self.requested:
            self.setting = ThreadSetting(profile.threads, f"{_threads(profile.threads)}: chosen by the last device "
                                                          f"profile ({describe_points(profile.thread_points)})")
            on_forward_thread(self.setting.apply)
            log.info("%s", self.setting.reason)

    def _saved(self) -> tuple[ThreadSetting | None, str]:
        """The choice kept in the state directory if it was measured for this key, else why not."""
        if self.state_dir is None:
            return None, "no --state-dir"
        path = Path(self.state_dir) / FILE
        try:
            kept = json.loads(path.read_text())
            points = tuple(ThreadPoint(int(t), int(ns)) for t, ns in kept.get("thread_points", ()))
            key = ThreadKey(kept["model_fingerprint"], kept["device"], int(kept["cores"]))
            threads = int(kept["threads"])
        except FileNotFoundError:
            return None, f"no device profile's choice in {path}"
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("ignoring %s: not a thread choice (%s)", path, error)
            return None, f"{path} is not a thread choice"
        if key != self.key or not 1 <= threads <= self.key.cores:
            return None, f"the choice in {path} was measured for another model, device or set of cores"
        return ThreadSetting(threads, f"{_threads(threads)}: chosen by the device profile kept in {path} "
                                      f"({describe_points(points)})"), ""

    def _probe(self, measure: Callable, runtime, missing: str) -> ThreadSetting:
        counts = thread_counts(self.key.cores)
        if len(counts) == 1:
            return ThreadSetting(counts[0], f"{_threads(counts[0])}: this process may use one core")
        points, chosen = measure(runtime, counts, PROBE_ROUNDS, PROBE_PASSES)
        return ThreadSetting(chosen, f"{_threads(chosen)}: measured at start-up, {missing} "
                                     f"({describe_points(points)})")


def choice_json(key: ThreadKey, threads: int, points: Sequence[ThreadPoint]) -> str:
    """The state directory's ``FILE``: a choice, what it was measured for, and the measurements."""
    return json.dumps(dict(threads=threads, model_fingerprint=key.model_fingerprint, device=key.device,
                           cores=key.cores, thread_points=[[p.threads, p.step_ns] for p in points]))


def _threads(count: int) -> str:
    return f"{count} torch intra-op thread{'s' if count != 1 else ''}"
