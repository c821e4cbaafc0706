"""What an executor sends its planner up the Connect stream: a registration naming the model it
serves, budget changes at once, and the periodic telemetry the planner's Welcome asks for."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from swapmoe.core.fingerprint import model_fingerprint
from swapmoe.core.plan import BudgetChange
from swapmoe.core.sizes import format_size
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import transport
from swapmoe.v1 import (executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc,
                        telemetry_pb2 as tpb)

from polling import wait_until
from serving import own_engine, serving


class RecordingPlanner(planner_pb2_grpc.PlannerServiceServicer):
    """A planner on loopback that answers each registration with ``welcome`` (none: it never
    answers) and records every message an executor sends."""

    def __init__(self, welcome: ppb.Welcome | None):
        self.welcome = welcome
        self.received: list[ppb.ExecutorMessage] = []
        self.server = transport.start_server(
            lambda server: planner_pb2_grpc.add_PlannerServiceServicer_to_server(self, server), [])
        self.address = f"127.0.0.1:{self.server.port}"

    def Connect(self, request_iterator, context):
        self.received.append(next(request_iterator))
        if self.welcome is not None:
            yield ppb.PlannerMessage(welcome=self.welcome)
        with contextlib.suppress(grpc.RpcError):  # the executor left: its link stopped
            for message in request_iterator:
                self.received.append(message)

    def of_kind(self, kind: str) -> list:
        return [getattr(m, kind) for m in self.received if m.WhichOneof("message") == kind]

    def reports(self, payload: str) -> list:
        return [getattr(t, payload) for t in self.of_kind("telemetry") if t.WhichOneof("payload") == payload]


@pytest.fixture(scope="module")
def telemetry_engine(tiny_model_dir):
    with own_engine(tiny_model_dir, "telemetry-test") as engine:
        yield engine


@pytest.fixture(scope="module")
def executor(telemetry_engine):
    with serving(telemetry_engine) as channel:
        yield executor_pb2_grpc.ExecutorServiceStub(channel)


@pytest.fixture
def connect(telemetry_engine):
    """``connect(welcome)``: a recording planner, and a link from the engine to it."""
    started: list[tuple[PlannerLink, RecordingPlanner]] = []

    def start(welcome: ppb.Welcome | None) -> RecordingPlanner:
        planner = RecordingPlanner(welcome)
        started.append((PlannerLink(telemetry_engine, planner.address).start(), planner))
        wait_until(lambda: planner.received, timeout=10, what="the registration")
        return planner

    yield start
    for link, planner in started:
        link.stop()
        planner.server.stop(grace=0)


def welcome(interval_ms: int, *topics: int) -> ppb.Welcome:
    return ppb.Welcome(telemetry_interval_ms=interval_ms, topics=topics)


def activations(report: tpb.ExpertReport) -> int:
    return sum(sum(layer.activations) for layer in report.layers)


def test_the_registration_names_the_model_by_its_content_fingerprint(connect, tiny_model_dir):
    planner = connect(welcome(0))
    registration = planner.received[0].registration
    assert registration.node_id == "telemetry-test"
    assert registration.model_fingerprint and registration.model_fingerprint == model_fingerprint(tiny_model_dir)


def test_experts_reports_count_only_the_activations_routed_in_their_own_window(connect, telemetry_engine, executor):
    planner = connect(welcome(200, tpb.TOPIC_EXPERTS, tpb.TOPIC_THROUGHPUT))
    wait_until(lambda: planner.reports("experts"), timeout=10, what="a first experts report")
    before = len(planner.reports("experts"))
    list(executor.Generate(epb.GenerateRequest(text="import os", max_new_tokens=8), timeout=30))
    # One report may be on its way as the generation ends: later windows start after that one.
    after = len(planner.reports("experts")) + 1
    reports = wait_until(lambda: len(r := planner.reports("experts")) > after + 1 and r, timeout=10,
                         what="two experts reports after the generation")

    assert all(len(r.layers) == len(telemetry_engine.layout.layers) for r in reports)
    assert all(activations(r) == 0 for r in reports[:before]), "windows before the generation are idle"
    assert sum(activations(r) for r in reports[before:after]) > 0, "the generation's windows saw it"
    assert all(activations(r) == 0 for r in reports[after:]), "later windows are idle: not cumulative"
    assert planner.reports("throughput") and not planner.reports("memory"), "only the topics asked for"
    assert max(t.tokens_total for t in planner.reports("throughput")) > 0


def test_periodic_telemetry_needs_a_welcome_with_an_interval_but_budget_changes_always_go_up(
        connect, telemetry_engine, executor):
    asked = connect(welcome(200, tpb.TOPIC_MEMORY))
    off = connect(welcome(0, tpb.TOPIC_MEMORY, tpb.TOPIC_EXPERTS))
    unwelcomed = connect(None)
    wait_until(lambda: asked.reports("memory"), timeout=10, what="the first memory report")

    executor.SetBudget(epb.SetBudgetRequest(budget_bytes=telemetry_engine.budget_bytes - 1, reason="test"), timeout=10)
    for planner in (asked, off, unwelcomed):
        change = wait_until(lambda: planner.of_kind("budget_change"), timeout=10, what="the budget change")[0]
        assert change.budget_bytes == change.previous_budget_bytes - 1 and change.reason.endswith("test")
    seen = len(asked.reports("memory"))
    wait_until(lambda: len(asked.reports("memory")) >= seen + 2, timeout=10, what="two more memory reports")

    assert not off.of_kind("telemetry") and not unwelcomed.of_kind("telemetry")


def test_an_interval_too_short_is_raised_to_a_tenth_of_a_second(connect):
    planner = connect(welcome(1, tpb.TOPIC_MEMORY))
    reports = wait_until(lambda: len(r := planner.of_kind("telemetry")) >= 4 and r, timeout=10,
                         what="four memory reports")
    gaps = [(b.timestamp_ns - a.timestamp_ns) / 1e9 for a, b in zip(reports, reports[1:])]
    assert min(gaps) >= 0.09, gaps


def test_a_new_stream_starts_its_windows_afresh(connect, executor):
    list(executor.Generate(epb.GenerateRequest(text="def f():", max_new_tokens=8), timeout=30))
    planner = connect(welcome(100, tpb.TOPIC_EXPERTS))
    first = wait_until(lambda: planner.reports("experts"), timeout=10, what="a first experts report")[0]
    assert activations(first) == 0, "the first window starts at the Welcome, not at the engine's start"


def test_a_budget_set_on_the_device_reaches_the_planner_as_its_own_message_and_a_plans_budget_sends_none(
        telemetry_engine, executor):
    """Control is a message: SetBudget goes up as a BudgetChange with its own reason; a budget that
    came with a plan is answered by the plan's ACK, never echoed back as a change."""
    server, registry = serve_planner("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    heard, on_budget_change = [], registry.on_budget_change
    registry.on_budget_change = lambda record, change: (heard.append(change), on_budget_change(record, change))
    link = PlannerLink(telemetry_engine, f"127.0.0.1:{server.port}").start()
    node = telemetry_engine.config.node_id
    try:
        record = wait_until(lambda: registry.connected(node) and registry.find([node])[0], timeout=10,
                            what="the executor registered")
        wait_until(lambda: record.state == ppb.PLAN_STATE_ACKED, timeout=10, what="its first plan ACKed")
        before = telemetry_engine.budget_bytes
        executor.SetBudget(epb.SetBudgetRequest(budget_bytes=before - 1, reason="thermal"), timeout=10)
        wait_until(lambda: heard, timeout=10, what="the budget change")
        assert heard == [BudgetChange(before, before - 1, "thermal")]
        assert f"budget change to {format_size(before - 1)} (thermal);" in record.reason

        with transport.channel(f"127.0.0.1:{server.port}") as channel:
            planner_pb2_grpc.PlannerServiceStub(channel).PushPlan(
                ppb.PushPlanRequest(node_ids=[node], budget_bytes=before - 2), timeout=10)
        wait_until(lambda: record.state == ppb.PLAN_STATE_ACKED and record.acked.budget_bytes == before - 2,
                   timeout=10, what="the plan carrying a budget ACKed")
        assert telemetry_engine.budget_bytes == record.budget_bytes == before - 2
        # One stream keeps its order: had the plan's budget gone up as a change, it would come first.
        executor.SetBudget(epb.SetBudgetRequest(budget_bytes=before, reason="cooled"), timeout=10)
        wait_until(lambda: len(heard) > 1, timeout=10, what="the second budget change")
        assert heard[1:] == [BudgetChange(before - 2, before, "cooled")]
    finally:
        link.stop()
        server.stop(0)
        registry.policy.close()
