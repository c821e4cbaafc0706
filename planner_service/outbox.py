"""What the planner still has to send one executor: bounded, and woken without polling.

Plans supersede each other (versions only grow and an executor runs the newest), so the
outbox keeps at most one unsent plan: a newer plan replaces an older one that has not left
yet. Profile asks and cancels are few (one profile per executor at a time) but bounded
anyway. The registry fills outboxes from any thread; the stream that drains one lives on the
server's event loop, which is woken through ``call_soon_threadsafe``, so 10,000 idle streams
cost no thread and no timer.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from swapmoe.core.plan import Plan

MAX_MESSAGES = 16  # profile asks and cancels waiting to be sent


class Overflow(Exception):
    """An outbox's bounded queue is full: its executor does not read what it is sent."""


class Outbox:
    def __init__(self):
        self._lock = threading.Lock()
        self._plan: Plan | None = None
        self._messages: deque = deque()
        self._end: tuple | None = None  # (error or None,) once the stream must end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None

    def put_plan(self, plan: Plan) -> None:
        with self._lock:
            self._plan = plan
        self._wake()

    def put(self, message) -> None:
        """A message other than a plan; past ``MAX_MESSAGES`` unsent, the stream ends with Overflow."""
        with self._lock:
            if len(self._messages) >= MAX_MESSAGES:
                self._end = self._end or (Overflow(f"more than {MAX_MESSAGES} messages wait to be sent"),)
            else:
                self._messages.append(message)
        self._wake()

    def close(self, error: Exception | None = None) -> None:
        """End the stream after what is queued (with ``error``'s status when given)."""
        with self._lock:
            self._end = self._end or (error,)
        self._wake()

    def take(self):
        """The next thing to send without waiting: a message, then the plan; ``None`` when empty.
        Raises ``Ended`` once the stream must end."""
        with self._lock:
            if self._messages:
                return self._messages.popleft()
            if self._plan is not None:
                plan, self._plan = self._plan, None
                return plan
            if self._end is not None:
                raise Ended(self._end[0])
            return None

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._messages) or self._plan is not None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake ``loop``'s ``get`` when something is put (the stream draining this outbox)."""
        with self._lock:
            self._loop, self._ready = loop, asyncio.Event()

    async def get(self):
        """The next thing to send, waiting on the bound loop until there is one."""
        while True:
            self._ready.clear()
            item = self.take()
            if item is not None:
                return item
            await self._ready.wait()

    def _wake(self) -> None:
        loop, ready = self._loop, self._ready
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass


class Ended(Exception):
    """The stream ends; ``error`` (if any) is the status it ends with."""

    def __init__(self, error: Exception | None):
        super().__init__(str(error) if error else "stream ended")
        self.error = error
