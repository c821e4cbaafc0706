"""The scheduler is pure bookkeeping: what the next forward pass does, who waits, who is preempted,
when an exclusive job may run. No model, no threads, no torch."""

import subprocess
import sys

import pytest

from swapmoe.core.errors import Busy
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.scheduler import Scheduler, Sequence, Work

EOS = 0


def sequence(limit: int = 3, prompt=(5, 6)) -> Sequence:
    return Sequence(GenerationRequest(tuple(prompt), limit), limit)


def run(scheduler: Scheduler, work: Work, token: int = 7) -> None:
    """What a runner would return: ``token`` for every sequence of the pass."""
    scheduler.postprocess(work, [token] * len(work.sequences), 0)


@pytest.mark.slow
def test_importing_the_scheduler_imports_no_torch():
    code = "import sys, swapmoe.executor.scheduler, swapmoe.executor.requests; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_each_request_joins_alone_then_the_batch_decodes_together():
    scheduler = Scheduler(capacity=4, max_queue=4, joins_per_pass=4)
    a, b = sequence(), sequence()
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule(0)
    assert first.join is a and first.sequences == (a,)
    run(scheduler, first)
    second = scheduler.schedule(0)
    assert second.join is b
    run(scheduler, second)
    third = scheduler.schedule(0)
    assert third.join is None and third.decode == (a, b) and third.sequences == (a, b)


def test_at_most_joins_per_pass_prefills_run_between_two_decode_passes():
    scheduler = Scheduler(capacity=8, max_queue=8, joins_per_pass=2)
    for _ in range(5):
        scheduler.add(sequence(limit=10))
    kinds = []
    for _ in range(7):
        work = scheduler.schedule(0)
        kinds.append("join" if work.join else "decode")
        run(scheduler, work)
    assert kinds == ["join", "join", "decode", "join", "join", "decode", "join"]


def test_a_sequence_ends_at_its_limit_or_an_end_token_and_leaves_at_the_next_step():
    scheduler = Scheduler(capacity=2, max_queue=2, eos=frozenset({EOS}))
    short, stopped = sequence(limit=1), sequence(limit=5)
    scheduler.add(short)
    scheduler.add(stopped)
    run(scheduler, scheduler.schedule(0))  # short's one token
    assert short.done and short.generated == [7]
    joined = scheduler.schedule(0)
    assert joined.leave == (0,) and joined.join is stopped  # short's row goes before the pass
    run(scheduler, joined, token=EOS)
    assert stopped.done
    assert scheduler.schedule(0) == Work(leave=(0,))  # only rows leaving
    assert scheduler.schedule(0) is None and not scheduler.ready


def test_past_max_queue_waiting_a_request_is_refused_busy():
    scheduler = Scheduler(capacity=1, max_queue=1)
    scheduler.add(sequence())
    scheduler.add(sequence())
    with pytest.raises(Busy, match="max_queue 1"):
        scheduler.add(sequence())


def test_an_aborted_sequence_leaves_the_queue_at_once_and_its_row_at_the_next_step():
    scheduler = Scheduler(capacity=2, max_queue=2)
    running, waiting = sequence(limit=9), sequence()
    scheduler.add(running)
    run(scheduler, scheduler.schedule(0))
    scheduler.add(waiting)
    scheduler.abort(waiting)
    scheduler.abort(running)
    assert not scheduler.waiting
    assert scheduler.schedule(0) == Work(leave=(0,))


def test_a_smaller_limit_preempts_the_newest_rows_which_rejoin_with_what_they_made():
    scheduler = Scheduler(capacity=3, max_queue=3)
    rows = [sequence(limit=9, prompt=(i + 1,)) for i in range(3)]
    for s in rows:
        scheduler.add(s)
    for _ in range(3):
        run(scheduler, scheduler.schedule(0))
    assert scheduler.resize(1) == (1, 2)  # the runner drops these rows
    assert scheduler.rows == rows[:1] and list(scheduler.waiting) == rows[1:]
    assert scheduler.schedule(0).decode == (rows[0],)  # no room to rejoin
    scheduler.resize(3)
    rejoin = scheduler.schedule(0)
    assert rejoin.join is rows[1] and rejoin.join.context == (2, 7)  # prompt + the token made before


def test_an_exclusive_job_waits_for_earlier_generations_and_later_ones_wait_for_it():
    scheduler = Scheduler(capacity=2, max_queue=4)
    earlier, later = sequence(limit=1), sequence()
    scheduler.add(earlier)
    ticket = scheduler.arrive_exclusive()
    scheduler.add(later)
    assert not scheduler.exclusive_ready(ticket)
    work = scheduler.schedule(0)
    assert work.join is earlier
    run(scheduler, work)
    assert scheduler.schedule(0) == Work(leave=(0,))  # the later one may not join meanwhile
    assert scheduler.exclusive_ready(ticket)
    scheduler.end_exclusive(ticket)
    assert scheduler.schedule(0).join is later


def test_a_failed_pass_ends_its_sequences_with_the_error():
    scheduler = Scheduler(capacity=2, max_queue=2)
    a = sequence()
    scheduler.add(a)
    work = scheduler.schedule(0)
    error = RuntimeError("out of memory")
    [emitted] = scheduler.fail(work, error)
    assert emitted.error is error and a.done and not scheduler.rows  # a failed prefill never joined
