"""Who runs when on an executor: one generation at a time, first come first served
(``Admission``); every forward pass on one thread, under the step lock; plan and budget
changes under the same lock, so they land between two forward passes and never inside one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from swapmoe.executor.admission import Admission


class Scheduler:
    def __init__(self, max_queue: int):
        self._admission = Admission(max_queue)
        self._step_lock = threading.Lock()
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix="forward")

    @property
    def waiting(self) -> int:
        """Generation requests waiting for their turn."""
        return self._admission.waiting

    @property
    def running(self) -> int:
        return self._admission.running

    @contextlib.contextmanager
    def turn(self, cancelled: Callable[[], bool]):
        """This generation's turn: waits for the ones before it. Raises Busy when too many
        wait already, Cancelled when ``cancelled()`` turns true while waiting."""
        self._admission.acquire(cancelled)
        try:
            yield
        finally:
            self._admission.release()

    def between_passes(self) -> threading.Lock:
        """Hold this (``with``) to change what forward passes see: no pass runs meanwhile."""
        return self._step_lock

    def run_ahead(self, tokens: Iterator[int], eos: set[int]) -> Iterator[tuple[int, int]]:
        """Yield (token, when it was computed), computing tokens on the one forward thread, each
        forward pass under the step lock, ahead of the consumer until it closes this iterator
        or EOS.

        The model always runs on the same thread whichever RPC thread serves the request (torch's
        intra-op thread team is per calling thread; teams left spinning by many request threads
        steal the cores from the one doing the work), and the next forward pass overlaps with
        decoding and sending the previous token."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def produce():
            try:
                while not stop.is_set():
                    with self._step_lock:
                        token = next(tokens, None)
                    if token is None:
                        break
                    out.put((token, time.perf_counter_ns()))
                    if token in eos:
                        break
            except BaseException as error:  # handed to the consumer
                out.put((error, 0))
            out.put((None, 0))

        job = self._forward_thread.submit(produce)
        try:
            while (item := out.get())[0] is not None:
                if isinstance(item[0], BaseException):
                    raise item[0]
                yield item
        finally:
            stop.set()
            job.result()  # the step in flight finishes before the caller closes ``tokens``

    def close(self) -> None:
        self._forward_thread.shutdown(wait=True)
