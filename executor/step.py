"""The step: schedule -> run -> postprocess, the one decode path of the project.

Serving (``Engine.step``), the device profile, accuracy scoring and the runtime benchmark all
generate through ``step``: the same scheduler bookkeeping, the same batch and forward pass, the
same expert updates between passes. ``generate_offline`` drives it without threads for the
measurements, with as many sequences at once as the runner's batch holds.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager, Iterable, Iterator

from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.model_runner import ModelRunner
from swapmoe.executor.scheduler import JOINS_PER_PASS, Emitted, Scheduler, Sequence


def step(scheduler: Scheduler, runner: ModelRunner,
         guard: ContextManager = contextlib.nullcontext()) -> list[Emitted] | None:
    """One forward pass (or only rows leaving); None when there is nothing to do. ``guard`` is held
    while the scheduler's state changes (the serving loop's lock: requests arrive meanwhile), never
    during the pass."""
    with guard:
        work = scheduler.schedule(time.perf_counter_ns())
    if work is None:
        return None
    try:
        tokens = runner.run(work)
    except Exception as error:  # noqa: BLE001 - handed to the pass's consumers
        with guard:
            return scheduler.fail(work, error)
    with guard:
        emitted = scheduler.postprocess(work, tokens, time.perf_counter_ns())
    if any(not e.sequence.done for e in emitted):
        runner.after_pass()
    return emitted


def generate_offline(runner: ModelRunner, requests: Iterable[GenerationRequest], eos: frozenset[int] = frozenset(),
                     joins_per_pass: int = JOINS_PER_PASS) -> Iterator[Emitted]:
    """Every request's tokens, as ``step`` makes them, in the order made; all requests are queued
    at once and run as many at a time as the runner's batch holds (``joins_per_pass`` as many as
    the batch holds: every prefill, then decode passes of them all). A failed pass raises."""
    requests = list(requests)
    scheduler = Scheduler(runner.capacity, len(requests), eos, joins_per_pass)
    for request in requests:
        scheduler.add(Sequence(request, request.max_new_tokens))
    try:
        while (emitted := step(scheduler, runner)) is not None:
            for e in emitted:
                if e.error is not None:
                    raise e.error
                yield e
    finally:  # closed early or failed: the rows still in the batch go, with their KV cache
        runner.leave(range(len(runner.batch)))


def tokens_offline(runner: ModelRunner, request: GenerationRequest, eos: frozenset[int] = frozenset()) -> list[int]:
    """One request's tokens."""
    return [e.token for e in generate_offline(runner, [request], eos)]
