"""The thin loop around ``Engine.step``: the forward thread, per-request queues, cancellation,
commands and exclusive jobs.

The model always runs on one thread whichever RPC thread serves a request (torch's intra-op
thread team is per calling thread; teams left spinning by many request threads steal the cores
from the one doing the work), and the next pass overlaps with decoding and sending the previous
tokens. Commands (a plan, a budget, a read of the experts' state) run on that thread at the top
of a step, so they land between two passes and never inside one. An exclusive job (a profile)
runs in short measurements, each alone once the generations that arrived before it have
finished (the order is the scheduler's).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, ContextManager, Iterator, TypeVar

from swapmoe.executor.scheduler import Emitted, Scheduler, Sequence

POLL_S = 0.05  # how often a waiting consumer looks at its client's ``cancelled()``
T = TypeVar("T")


class Cancelled(Exception):
    """The client went away (cancelled, deadline passed) while its request waited."""


class ServingLoop:
    def __init__(self, scheduler: Scheduler, step: Callable[[], bool]):
        """``step``: one step of the engine (commands, then a pass); False when it had nothing to do."""
        self.scheduler, self._step = scheduler, step
        self.guard = threading.Condition()  # the scheduler's state, the queues, and who waits on them
        self._lock = threading.Lock()  # a step or an exclusive measurement, one at a time
        self._outs: dict[Sequence, queue.SimpleQueue] = {}
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._looping = False
        self._jobs = 0  # exclusive jobs in progress
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")

    @property
    def running(self) -> int:
        """Generations in the batch, plus the exclusive jobs in progress."""
        return self.scheduler.running + self._jobs

    # --- commands ----------------------------------------------------------------------------
    def call(self, command: Callable[[], T]) -> T:
        """``command()`` on the forward thread at the top of the next step; its result or exception.
        Not from the forward thread itself, nor inside an exclusive measurement."""
        future: Future = Future()
        with self.guard:
            self._commands.append((command, future))
            self._wake()
        return future.result()

    def run_commands(self) -> None:
        """The commands waiting, in the order given (the top of ``Engine.step``)."""
        while True:
            with self.guard:
                if not self._commands:
                    return
                command, future = self._commands.popleft()
            try:
                future.set_result(command())
            except BaseException as error:  # noqa: BLE001 - the caller gets it
                future.set_exception(error)

    def deliver(self, emitted: list[Emitted]) -> None:
        """Each token to its consumer; an ended sequence's queue gets its end."""
        for e in emitted:
            out = self._outs.get(e.sequence)
            if out is None:
                continue
            out.put((e.error, 0) if e.error is not None else (e.token, e.computed_ns))
            if e.sequence.done:
                out.put((None, 0))

    # --- generations -------------------------------------------------------------------------
    def generate(self, sequence: Sequence, cancelled: Callable[[], bool]) -> Iterator[tuple[int, int]]:
        """Queue ``sequence`` and yield (token, when it was computed) as the batch makes them.
        Raises Busy when ``max_queue`` requests wait already, Cancelled when ``cancelled()`` turns
        true before the first token. Closing the iterator takes the sequence out of the batch
        before its next pass."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        with self.guard:
            self.scheduler.add(sequence)
            self._outs[sequence] = out
            self._wake()
        started = False
        try:
            while True:
                try:
                    token, computed = out.get(timeout=POLL_S)
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
            with self.guard:
                del self._outs[sequence]
                if not sequence.done:
                    self.scheduler.abort(sequence)
                self._wake()

    # --- exclusive jobs ------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self, cancelled: Callable[[], bool]) -> Iterator[Callable[[], ContextManager[None]]]:
        """An exclusive job, counted as running while it lasts; yields ``measurement``: each
        ``with measurement():`` runs alone, with no step running, once the generations that
        arrived before it have finished. Raises Cancelled when ``cancelled()`` turns true while
        one waits."""
        with self.guard:
            self._jobs += 1
        try:
            yield lambda: self._measurement(cancelled)
        finally:
            with self.guard:
                self._jobs -= 1
                self.guard.notify_all()

    @contextlib.contextmanager
    def _measurement(self, cancelled: Callable[[], bool]):
        with self.guard:
            ticket = self.scheduler.arrive_exclusive()
            try:
                while not self.scheduler.exclusive_ready(ticket):
                    if cancelled():
                        raise Cancelled()
                    self.guard.wait(POLL_S)
            except BaseException:
                self._end(ticket)
                raise
        try:
            with self._lock:
                yield
        finally:
            with self.guard:
                self._end(ticket)

    def _end(self, ticket: int) -> None:
        self.scheduler.end_exclusive(ticket)
        self._wake()

    # --- the forward thread ------------------------------------------------------------------
    def _wake(self) -> None:
        """Start the loop on the forward thread if there is work and it is not running (guard held)."""
        self.guard.notify_all()
        if not self._looping and (self._commands or self.scheduler.ready):
            self._looping = True
            self._thread.submit(self._loop)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    progressed = self._step()
                with self.guard:
                    self.guard.notify_all()  # exclusive jobs wait for the batch to empty
                    if not progressed and not self._commands:
                        return
        finally:
            with self.guard:
                self._looping = False
                self._wake()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
