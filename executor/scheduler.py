"""Who runs in the next forward pass: continuous batching as pure bookkeeping (no torch, no threads).

Requests wait first come, first served; past ``max_queue`` waiting they are refused (Busy,
RESOURCE_EXHAUSTED, so a client backs off instead of piling up). Each step is one forward pass:
a prefill of one waiting request, which joins the batch as its last row ("prefill alone, decode
together": ``kv_batch``), or a decode pass over every row. Up to ``joins_per_pass`` prefills run
between two decode passes, so the running streams wait for that many prompts at most. Rows
whose generation ended, or whose consumer left, leave at the start of the next step.

A smaller ``limit`` (a budget cut) preempts the newest rows: they go back to the head of the
queue with what they generated so far and rejoin with a prefill of prompt and tokens when there
is room again. An exclusive job (a profile's measurement) waits for the generations that arrived
before it; generations arriving after it wait for it, so a long job delays a request by one
measurement, never by the whole job.

The serving loop (``executor.serving_loop``) calls this under its lock; offline drivers
(``executor.step.generate_offline``) call it alone.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from swapmoe.core.errors import Busy
from swapmoe.executor.requests import GenerationRequest

# With 16 clients on the bundled model (benchmarks.service, in-process): every waiting request at
# once gave 5.3x one stream's tokens/s and inter-token p99 226 ms; one per pass 4.6x and 63 ms;
# four per pass 4.9x and 152 ms.
JOINS_PER_PASS = 4


@dataclass(eq=False)
class Sequence:
    """One generation: its request, how many tokens it may make, what it made so far, and the
    runner's sampling state for it (a seeded generator when it samples)."""

    request: GenerationRequest
    limit: int
    sampler: Any = None
    arrival: int = 0  # its place in the order requests and exclusive jobs arrived in
    joined_ns: int = 0  # when its first prefill was scheduled (perf_counter_ns)
    generated: list[int] = field(default_factory=list)
    done: bool = False
    leaving: bool = False  # its consumer is gone

    @property
    def made(self) -> int:
        return len(self.generated)

    @property
    def last(self) -> int:
        return self.generated[-1]

    @property
    def context(self) -> tuple[int, ...]:
        """What a (re)join prefills: the prompt and the tokens made before a preemption."""
        return tuple(self.request.prompt_ids) + tuple(self.generated)


@dataclass(frozen=True, slots=True)
class Work:
    """One step: rows that leave first (their indices before the pass), then one forward pass:
    the prefill of ``join`` (its new row is the last), or a decode pass of ``decode`` (every row,
    in row order), or none."""

    leave: tuple[int, ...] = ()
    join: Sequence | None = None
    decode: tuple[Sequence, ...] = ()

    @property
    def sequences(self) -> tuple[Sequence, ...]:
        """Whose next token the pass computes, in the order of its logits."""
        return (self.join,) if self.join is not None else self.decode


@dataclass(frozen=True, slots=True)
class Emitted:
    """A token a pass made for a sequence (``token`` None: it ended with ``error`` instead)."""

    sequence: Sequence
    token: int | None
    computed_ns: int
    error: BaseException | None = None


class Scheduler:
    def __init__(self, capacity: int, max_queue: int, eos: frozenset[int] = frozenset(),
                 joins_per_pass: int = JOINS_PER_PASS):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.capacity, self.max_queue, self.eos, self.joins_per_pass = capacity, max_queue, eos, joins_per_pass
        self.limit = capacity  # rows the budget allows now (``resize``)
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # the batch, in row order
        self._arrivals = itertools.count(1)
        self._exclusive: list[int] = []  # arrivals of the exclusive jobs waiting or running, oldest first
        self._prefills = 0  # prefills since the last decode pass

    # --- arrivals and departures ------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        """Queue ``sequence``; Busy when ``max_queue`` requests wait already."""
        if len(self.waiting) + len(self.rows) >= self.capacity + self.max_queue:
            raise Busy(f"{len(self.waiting)} requests are already waiting, the most this executor "
                       f"queues (max_queue {self.max_queue}); retry later")
        sequence.arrival = next(self._arrivals)
        self.waiting.append(sequence)

    def abort(self, sequence: Sequence) -> None:
        """Its consumer is gone: out of the queue now, out of the batch at the next step."""
        sequence.leaving = True
        if sequence in self.waiting:
            self.waiting.remove(sequence)

    def resize(self, limit: int) -> tuple[int, ...]:
        """At most ``limit`` rows from now on; returns the rows preempted (the newest past it), whose
        sequences are back at the head of the queue. The caller drops those rows from the batch."""
        self.limit = max(1, min(limit, self.capacity))
        gone = tuple(range(self.limit, len(self.rows)))
        if gone:
            preempted, self.rows = self.rows[self.limit:], self.rows[:self.limit]
            self.waiting.extendleft(reversed(preempted))
        return gone

    # --- exclusive jobs ---------------------------------------------------------------------
    def arrive_exclusive(self) -> int:
        """An exclusive job's place in the order; later generations wait for it (``end_exclusive``)."""
        ticket = next(self._arrivals)
        self._exclusive.append(ticket)
        return ticket

    def exclusive_ready(self, ticket: int) -> bool:
        """Whether the job may run now: the oldest one waiting, nothing in the batch, no
        generation that arrived before it waiting."""
        return (self._exclusive[0] == ticket and not self.rows
                and not any(s.arrival < ticket for s in self.waiting))

    def end_exclusive(self, ticket: int) -> None:
        self._exclusive.remove(ticket)

    def _admits(self, sequence: Sequence) -> bool:
        return not self._exclusive or sequence.arrival < self._exclusive[0]

    @property
    def ready(self) -> bool:
        """Whether a step has something to do."""
        return bool(self.rows) or bool(self.waiting and self._admits(self.waiting[0]) and len(self.rows) < self.limit)

    # --- the step ----------------------------------------------------------------------------
    def schedule(self, now_ns: int) -> Work | None:
        """The next step's work, None when there is none."""
        leave = tuple(i for i, s in enumerate(self.rows) if s.done or s.leaving)
        if leave:
            self.rows = [s for s in self.rows if not (s.done or s.leaving)]
        if self._prefills < self.joins_per_pass and (joining := self._next_waiting()) is not None:
            self._prefills += 1
            joining.joined_ns = joining.joined_ns or now_ns  # a preempted one keeps its first
            self.rows.append(joining)
            return Work(leave, join=joining)
        self._prefills = 0
        if self.rows:
            return Work(leave, decode=tuple(self.rows))
        return Work(leave) if leave else None

    def postprocess(self, work: Work, tokens: list[int], now_ns: int) -> list[Emitted]:
        """Each sequence of the pass takes its token; one that made an end token or its limit is done."""
        emitted = []
        for sequence, token in zip(work.sequences, tokens):
            sequence.generated.append(token)
            sequence.done = token in self.eos or sequence.made >= sequence.limit
            emitted.append(Emitted(sequence, token, now_ns))
        return emitted

    def fail(self, work: Work, error: BaseException) -> list[Emitted]:
        """The pass raised: its sequences end with ``error`` (a failed prefill never joined)."""
        if work.join is not None:
            self.rows.remove(work.join)
        for sequence in work.sequences:
            sequence.done = True
        return [Emitted(s, None, 0, error) for s in work.sequences]

    def _next_waiting(self) -> Sequence | None:
        while self.waiting and len(self.rows) < self.limit and self._admits(self.waiting[0]):
            sequence = self.waiting.popleft()
            if not sequence.leaving:
                return sequence
        return None

    @property
    def running(self) -> int:
        return len(self.rows)
