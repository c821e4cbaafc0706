"""Admission of generation requests: one runs at a time, the rest wait first come, first
served, and a bounded number may wait (past that: RESOURCE_EXHAUSTED, so a client backs
off instead of piling up). A waiting request whose client went away leaves the queue.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from swapmoe.core.errors import Busy


class Cancelled(Exception):
    """The client went away (cancelled, deadline passed) while its request waited."""


class Admission:
    def __init__(self, max_waiting: int, poll_seconds: float = 0.05):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._poll = poll_seconds
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._running = False

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return int(self._running)

    def acquire(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait for this request's turn; raises Busy when the queue is full, Cancelled when
        ``cancelled()`` turns true while waiting."""
        ticket = object()
        with self._cond:
            if (self._running or self._queue) and len(self._queue) >= self.max_waiting:
                raise Busy(f"{len(self._queue)} requests are already waiting, the most this executor "
                           f"queues (max_queue {self.max_waiting}); retry later")
            self._queue.append(ticket)
            try:
                while self._running or self._queue[0] is not ticket:
                    if cancelled():
                        raise Cancelled()
                    self._cond.wait(self._poll)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._running = True

    def release(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
