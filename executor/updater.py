"""Expert updates off the forward thread: a worker that decides, pending tables the forward thread installs.

Deciding an update (reading importance, moving scores, the slot pool's bookkeeping, building
the routing tables that follow) is a few hundred microseconds of small tensor ops and Python
per layer: on a small model, a tenth of a token. So it runs on a thread of its own, overlapping
the next forward pass, and the forward thread only does what must happen between two passes:
installing the tables the worker built and starting the loads those tables make safe (a load
writes a slot that the tables installed before it no longer route to).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class Worker:
    """One daemon thread running ``work(due)`` each time it is kicked; ``due`` is the union of
    what the kicks since the last run passed."""

    def __init__(self, work: Callable[[set[int]], None], name: str):
        self._work = work
        self._due: set[int] = set()
        self._kicked = self._busy = self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def kick(self, items: Iterable[int] = ()) -> None:
        with self._cond:
            self._due.update(items)
            self._kicked = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every kick so far has been worked off."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._kicked or self._busy) or self._closed, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._kicked or self._closed)
                if self._closed:
                    return
                due, self._due, self._kicked, self._busy = self._due, set(), False, True
            try:
                self._work(due)
            except Exception:  # logged; the next kick tries again
                log.exception("expert update failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


@dataclass(slots=True)
class PendingTables:
    """What the worker made for the forward thread: each layer's newest routing tables, and the
    loads that may start once those are installed. Thread-safe."""

    tables: dict = field(default_factory=dict)  # layer -> its newest tables, not installed yet
    loads: list = field(default_factory=list)  # waiting for the tables posted with or before them
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, layer: int, tables, loads: Iterable = ()) -> None:
        with self._lock:
            self.tables[layer] = tables
            self.loads.extend(loads)

    def take(self) -> tuple[dict, list]:
        """Everything posted so far (tables before loads: install them first)."""
        with self._lock:
            tables, loads = self.tables, self.loads
            self.tables, self.loads = {}, []
        return tables, loads

    def waiting(self, layer: int) -> bool:
        """Whether tables for ``layer`` wait to be installed (what routing uses is older)."""
        with self._lock:
            return layer in self.tables

    def drop(self, layer: int) -> None:
        """Forget the tables waiting for ``layer`` (newer ones were installed directly)."""
        with self._lock:
            self.tables.pop(layer, None)
