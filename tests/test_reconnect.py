"""An executor comes back to its planner with jittered exponential backoff, so a fleet that lost
its planner at one instant does not arrive at the restarted planner at one instant: the pure
delays first, then real links dialing a port where the planner is down, refuses, or comes later."""

from __future__ import annotations

import logging
import random
import socket
import statistics
import threading
import time

import pytest

from swapmoe.executor.planner_link import PlannerLink, Reconnect, backoff_delays
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import transport
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until
from serving import own_engine

FAST = Reconnect(initial_s=0.2, maximum_s=1.0, stable_s=60.0)


def first(n: int, delays) -> list[float]:
    return [next(delays) for _ in range(n)]


def test_each_delay_lies_between_zero_and_its_growing_cap():
    for seed in range(200):
        delays = first(8, backoff_delays(1.0, 10.0, 2.0, random.Random(seed)))
        caps = [1, 2, 4, 8, 10, 10, 10, 10]
        assert all(0 <= d <= cap for d, cap in zip(delays, caps)), (seed, delays)


def test_delays_grow_until_the_cap_and_then_stay_spread_below_it():
    runs = [first(6, backoff_delays(1.0, 10.0, 2.0, random.Random(seed))) for seed in range(2000)]
    means = [statistics.fmean(run[n] for run in runs) for n in range(6)]
    # Full jitter: the n-th delay is uniform on [0, cap], its mean half the cap (1, 2, 4, 8, 10, 10).
    for mean, cap in zip(means, [1, 2, 4, 8, 10, 10]):
        assert mean == pytest.approx(cap / 2, rel=0.1)
    assert max(run[5] for run in runs) > 9 and min(run[5] for run in runs) < 1, "spread over the whole window"


def test_a_fleet_that_lost_its_planner_at_once_spreads_its_first_retries_over_the_window():
    fleet = [next(backoff_delays(1.0, 10.0, 2.0, random.Random(seed))) for seed in range(1000)]
    assert len(set(fleet)) == len(fleet), "no two executors retry at the same instant"
    per_tenth = [sum(k / 10 <= t < (k + 1) / 10 for t in fleet) for k in range(10)]
    assert all(60 <= n <= 140 for n in per_tenth), per_tenth  # ~100 executors in each tenth of a second
    assert statistics.pstdev(fleet) == pytest.approx(1 / 12**0.5, rel=0.1)  # a uniform's spread


def test_reconnect_settings_must_make_sense():
    for bad in [dict(initial_s=0), dict(initial_s=20.0), dict(multiplier=0.5), dict(connect_timeout_s=0)]:
        with pytest.raises(ValueError, match="reconnect"):
            Reconnect(**bad)
    assert dict(Reconnect().channel_options()) == {"grpc.initial_reconnect_backoff_ms": 1000,
                                                   "grpc.max_reconnect_backoff_ms": 10_000,
                                                   "grpc.min_reconnect_backoff_ms": 20_000}


@pytest.fixture(scope="module")
def reconnect_engine(tiny_model_dir):
    with own_engine(tiny_model_dir, "reconnect-test") as engine:
        yield engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Refuser:
    """A TCP port that accepts each connection and closes it at once: a planner host whose
    process is not answering. Records when each connection attempt arrived."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.attempts: list[float] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.attempts.append(time.monotonic())
            connection.close()


@pytest.mark.slow
def test_the_transport_reconnects_with_grpcs_jittered_backoff_not_in_a_tight_loop(reconnect_engine, caplog):
    refuser = Refuser()
    link = PlannerLink(reconnect_engine, refuser.address, reconnect=FAST).start()
    try:
        with caplog.at_level(logging.WARNING, "swapmoe.executor.planner_link"):
            time.sleep(4)
        attempts = list(refuser.attempts)
    finally:
        link.stop()
        refuser.socket.close()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # gRPC's schedule with these settings: 0.2 s, then x1.6 up to 1 s, each ±20%: about 7 in 4 s.
    assert 4 <= len(attempts) <= 12, gaps
    assert min(gaps) >= 0.2 * 0.8 - 0.05, gaps
    assert max(gaps[-2:]) >= 0.6, f"the backoff grew toward its 1 s cap: {gaps}"
    assert not link.connected.is_set()
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1, "one warning per outage, not one per attempt"


@pytest.mark.slow
def test_an_executor_dialing_a_planner_that_is_down_connects_within_the_backoff_bound_once_it_starts(reconnect_engine):
    address = f"127.0.0.1:{free_port()}"
    link = PlannerLink(reconnect_engine, address, reconnect=FAST).start()
    planner = None
    try:
        time.sleep(3)  # refused for 3 s: the transport's backoff has reached its 1 s cap
        assert not link.connected.is_set()
        planner, _ = serve_planner(address, settings=PlannerSettings(profile_devices=False))
        started = time.monotonic()
        wait_until(link.connected.is_set, timeout=30, what="the executor's stream to the planner that came up")
        # At most one backoff (1 s, +20% jitter) after the planner came up, plus registering on a loaded machine.
        assert time.monotonic() - started <= FAST.maximum_s * 1.2 + 1.5
    finally:
        link.stop()
        if planner is not None:
            planner.stop(0)


class EndingPlanner(planner_pb2_grpc.PlannerServiceServicer):
    """A planner that welcomes each stream, keeps it ``hold`` seconds, then ends it; records when
    each registration came."""

    def __init__(self, hold: float):
        self.hold, self.registrations = hold, []
        self.server = transport.start_server(
            lambda server: planner_pb2_grpc.add_PlannerServiceServicer_to_server(self, server), [])
        self.address = f"127.0.0.1:{self.server.port}"

    def Connect(self, request_iterator, context):
        next(request_iterator)
        self.registrations.append(time.monotonic())
        yield ppb.PlannerMessage(welcome=ppb.Welcome())
        time.sleep(self.hold)


class Greatest(random.Random):
    """Draws every delay at the top of its window: the longest full jitter can wait."""

    def uniform(self, a, b):
        return b


@pytest.mark.slow
@pytest.mark.parametrize("hold, expected", [(0.0, "growing"), (0.5, "reset")])
def test_the_delay_between_streams_grows_while_streams_fail_and_starts_again_after_one_stayed_up(reconnect_engine, hold,
                                                                                                 expected):
    planner = EndingPlanner(hold)
    settings = Reconnect(initial_s=0.2, maximum_s=30.0, multiplier=8.0, stable_s=0.4)
    link = PlannerLink(reconnect_engine, planner.address, reconnect=settings, rng=Greatest()).start()
    try:
        time.sleep(4)
    finally:
        link.stop()
        planner.server.stop(grace=0)
    gaps = [b - a - hold for a, b in zip(planner.registrations, planner.registrations[1:])]
    if expected == "growing":  # 0.2 s, 1.6 s, then 12.8 s: three streams in 4 s
        assert len(planner.registrations) == 3 and gaps[1] >= 1.6, gaps
    else:  # each stream stayed up past stable_s: every delay is the first one again, 0.2 s
        assert len(planner.registrations) >= 4 and max(gaps) < 1.0, gaps
