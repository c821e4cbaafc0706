"""Who runs when on an executor: continuous batching of generations on one forward thread.

Requests join and leave a running batch between forward passes (``kv_batch``: each joins
with a prefill of its own, then every decode pass feeds one token per row); past the batch's
capacity they wait first come, first served, and past ``max_queue`` waiting they are refused
(RESOURCE_EXHAUSTED, so a client backs off instead of piling up). Every forward pass runs
under the step lock, and so do plan and budget changes, which therefore land between two
passes and never inside one. An exclusive job (a profile) runs in short steps, each of which
waits for the generations queued before it to finish and then runs alone; generations that
arrive meanwhile run between two steps (first come, first served by arrival), so a long job
delays a request by one step, never by the whole job.

The model always runs on the same thread whichever RPC thread serves a request (torch's
intra-op thread team is per calling thread; teams left spinning by many request threads
steal the cores from the one doing the work), and the next pass overlaps with decoding and
sending the previous tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

import torch

from swapmoe.core.errors import Busy
from swapmoe.executor.generation import GenerationRequest, choose_token, generator_for

POLL_S = 0.05  # how often a waiting consumer looks at its client's ``cancelled()``
# Prefills between two decode passes: the running streams wait for this many prompts at most.
# With 16 clients on the bundled model (benchmarks.service, in-process): every waiting request at
# once gave 5.3x one stream's tokens/s and inter-token p99 226 ms; one per pass 4.6x and 63 ms;
# four per pass 4.9x and 152 ms.
JOINS_PER_PASS = 4


class Cancelled(Exception):
    """The client went away (cancelled, deadline passed) while its request waited."""


@dataclass(eq=False)
class Sequence:
    """One generation in the scheduler: its request, how many tokens it may make, its own
    sampling generator, and the queue its tokens go to ((token, ns computed); (None, 0) ends it;
    an exception is handed over as it is)."""

    request: GenerationRequest
    limit: int
    generator: torch.Generator | None = None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    leaving: threading.Event = field(default_factory=threading.Event)  # its consumer is gone
    joined_ns: int = 0  # when its first prefill began (perf_counter_ns)
    arrival: int = 0  # its place in the order requests and exclusive steps arrived in
    generated: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def made(self) -> int:
        return len(self.generated)

    @property
    def last(self) -> int:
        return self.generated[-1]

    def emit(self, token: int, eos: set[int]) -> None:
        self.generated.append(token)
        self.out.put((token, time.perf_counter_ns()))
        if token in eos or self.made >= self.limit:
            self.end()

    def end(self, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            if error is not None:
                self.out.put((error, 0))
            self.out.put((None, 0))


def sequence_for(request: GenerationRequest, limit: int) -> Sequence:
    """A sequence with the generator its sampling needs (seeded as the request says)."""
    return Sequence(request, limit, generator_for(request.sampling))


class Scheduler:
    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._step_lock = threading.Lock()
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # the batch, in row order
        self._limit = 1  # rows the budget allows now (``resize``), at most the batch's capacity
        self._looping = False
        self._arrivals = itertools.count(1)  # generations and exclusive steps, in the order they came
        self._steps: list[int] = []  # arrivals of the exclusive steps held or waited for, oldest first
        self._jobs = 0  # exclusive jobs in progress
        self._batch = None
        self._between_passes: Callable[[], None] = lambda: None
        self._on_join: Callable[[], None] = lambda: None
        self._eos: set[int] = set()

    def attach(self, batch, between_passes: Callable[[], None], on_join: Callable[[], None], eos: set[int]) -> None:
        """What the loop drives: the batch (``kv_batch``), the runtime's work between passes
        and at each join, and the tokens that end a generation."""
        self._batch, self._between_passes, self._on_join, self._eos = batch, between_passes, on_join, eos
        self._limit = batch.capacity

    @property
    def capacity(self) -> int:
        return self._batch.capacity if self._batch is not None else 1

    @property
    def limit(self) -> int:
        """Rows the budget allows now."""
        return self._limit

    def resize(self, limit: int) -> None:
        """At most ``limit`` rows from now on (caller holds the step lock). The newest rows past it
        go back to the head of the queue with what they generated so far, and rejoin with a
        prefill of prompt and tokens when there is room again; their streams carry on."""
        self._limit = max(1, min(limit, self.capacity))
        if len(self._rows) > self._limit:
            gone = list(range(self._limit, len(self._rows)))
            self._batch.leave(gone)
            preempted, self._rows = self._rows[self._limit:], self._rows[:self._limit]
            with self._cond:
                self._waiting.extendleft(reversed(preempted))
                self._cond.notify_all()
        with self._cond:
            self._wake()

    @property
    def waiting(self) -> int:
        """Generation requests waiting for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Generations in the batch, plus the exclusive jobs in progress."""
        return len(self._rows) + self._jobs

    def between_passes(self) -> threading.Lock:
        """Hold this (``with``) to change what forward passes see: no pass runs meanwhile."""
        return self._step_lock

    # --- generations ------------------------------------------------------------
    def generate(self, sequence: Sequence, cancelled: Callable[[], bool]) -> Iterator[tuple[int, int]]:
        """Queue ``sequence`` and yield (token, when it was computed) as the batch makes them.
        Raises Busy when ``max_queue`` requests wait already, Cancelled when ``cancelled()``
        turns true before the first token. Closing the iterator takes the sequence out of the
        batch before its next pass."""
        with self._cond:
            if len(self._waiting) + len(self._rows) >= self.capacity + self.max_queue:
                raise Busy(f"{len(self._waiting)} requests are already waiting, the most this executor "
                           f"queues (max_queue {self.max_queue}); retry later")
            sequence.arrival = next(self._arrivals)
            self._waiting.append(sequence)
            self._wake()
        started = False
        try:
            while True:
                try:
                    token, computed = sequence.out.get(timeout=POLL_S)
                except queue.Empty:
                    if not started and cancelled():
                        raise Cancelled() from None
                    continue
                if token is None:
                    return
                if isinstance(token, BaseException):
                    raise token
                started = True
                yield token, computed
        finally:
            sequence.leaving.set()
            with self._cond:
                if sequence in self._waiting:
                    self._waiting.remove(sequence)
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self, cancelled: Callable[[], bool]) -> Iterator[Callable[[], ContextManager[None]]]:
        """An exclusive job (a profile), counted as running while it lasts; yields ``step``: each
        ``with step():`` runs alone, with the step lock held, once the generations that arrived
        before it have finished. Generations arriving during a step join after it, before the
        job's next step. Raises Cancelled when ``cancelled()`` turns true while a step waits."""
        with self._cond:
            self._jobs += 1
        try:
            yield lambda: self._step(cancelled)
        finally:
            with self._cond:
                self._jobs -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def _step(self, cancelled: Callable[[], bool]):
        with self._cond:
            arrival = next(self._arrivals)
            self._steps.append(arrival)
            try:
                while (self._steps[0] != arrival or self._rows or self._looping
                       or any(s.arrival < arrival for s in self._waiting)):
                    if cancelled():
                        raise Cancelled()
                    self._cond.wait(POLL_S)
            except BaseException:
                self._end_step(arrival)
                raise
        try:
            with self._step_lock:
                yield
        finally:
            with self._cond:
                self._end_step(arrival)

    def _end_step(self, arrival: int) -> None:
        self._steps.remove(arrival)
        self._wake()

    def _admits(self, sequence: Sequence) -> bool:
        """Whether ``sequence`` may join now: it came before every exclusive step waiting (lock held)."""
        return not self._steps or sequence.arrival < self._steps[0]

    def _wake(self) -> None:
        """Start the loop on the forward thread if there is work and it is not running (lock held)."""
        self._cond.notify_all()
        if not self._looping and self._waiting and self._admits(self._waiting[0]):
            self._looping = True
            self._forward_thread.submit(self._loop)

    def _loop(self) -> None:
        try:
            while self._iterate():
                pass
        finally:
            with self._cond:
                self._looping = False
                self._wake()

    def _iterate(self) -> bool:
        """One round: rows whose consumer left go, up to ``JOINS_PER_PASS`` waiting requests join
        while there is room, one decode pass for the batch. False once there is nothing to do."""
        with self._step_lock:
            self._leave([i for i, s in enumerate(self._rows) if s.done or s.leaving.is_set()])
            for _ in range(JOINS_PER_PASS):
                if (joining := self._next_waiting()) is None:
                    break
                self._join(joining)
            self._leave([i for i, s in enumerate(self._rows) if s.done])  # finished with their first token
            if not self._rows:
                return False
            try:
                logits = self._batch.decode([s.last for s in self._rows])
            except BaseException as error:  # handed to every consumer in the batch
                for s in self._rows:
                    s.end(error)
                self._leave(list(range(len(self._rows))))
                return True
            for row, s in enumerate(self._rows):
                s.emit(choose_token(logits[row], s.request.sampling, s.generator), self._eos)
            self._leave([i for i, s in enumerate(self._rows) if s.done])
            if self._rows:
                self._between_passes()
            return True

    def _next_waiting(self) -> Sequence | None:
        with self._cond:
            while self._waiting and len(self._rows) < self._limit and self._admits(self._waiting[0]):
                s = self._waiting.popleft()
                if not s.leaving.is_set():
                    return s
                s.end()
            return None

    def _join(self, s: Sequence) -> None:
        if not s.generated:  # a first join; a preempted sequence rejoins with what it made so far
            s.joined_ns = time.perf_counter_ns()
        self._on_join()
        try:
            logits = self._batch.join(tuple(s.request.prompt_ids) + tuple(s.generated))
        except BaseException as error:
            s.end(error)
            return
        self._rows.append(s)
        s.emit(choose_token(logits, s.request.sampling, s.generator), self._eos)
        if not s.done:
            self._between_passes()

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        self._batch.leave(rows)
        gone = set(rows)
        for i in rows:
            self._rows[i].end()
        self._rows = [s for i, s in enumerate(self._rows) if i not in gone]
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self._forward_thread.shutdown(wait=True)
