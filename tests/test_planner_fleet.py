"""The planner at fleet scale: streams on asyncio, paged and filtered status, budget policies as
plans, bounded outboxes. Several hundred simulated executors speak the real Connect protocol
(simulation/fleet.py) to a real planner on loopback."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.core.plan import Plan
from swapmoe.planner_service.outbox import MAX_MESSAGES, Ended, Outbox, Overflow
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve
from swapmoe.rpc import transport
from swapmoe.simulation.fleet import SimSettings, SimulatedFleet
from swapmoe.v1 import common_pb2, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until

NODES = 300


@pytest.fixture(scope="module")
def fleet():
    server, registry = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False), control_address="127.0.0.1:0")
    address = f"127.0.0.1:{server.port}"
    labels = [{"class": "phone", "region": "eu"}, {"class": "phone", "region": "us"}, {"class": "tablet", "region": "eu"}]
    sim = SimulatedFleet(SimSettings(address, count=NODES, labels=labels, telemetry_interval_s=1.0)).start()
    channel = transport.channel(address)
    try:
        sim.wait_connected(timeout=60)
        sim.wait_acked(1, timeout=60)
        with transport.channel(f"127.0.0.1:{server.control_port}") as control:
            yield sim, planner_pb2_grpc.PlannerServiceStub(channel), channel, registry, control
    finally:
        channel.close()
        sim.stop()
        server.stop(0)


def every_page(stub, **request):
    """Every executor the request matches, page by page, and the first page's summary."""
    statuses, token, summary = [], "", None
    while True:
        page = stub.GetPlanStatus(ppb.PlanStatusRequest(page_token=token, **request), timeout=10)
        statuses += page.executors
        summary = summary or page.summary
        if not (token := page.next_page_token):
            return statuses, summary


@pytest.mark.slow
def test_hundreds_of_executors_hold_streams_without_a_thread_each(fleet):
    sim, stub, _, _, _ = fleet
    import threading

    assert sim.stats()["connected"] == NODES
    assert threading.active_count() < 80, "streams must not hold threads (the planner and the simulator share this process)"


@pytest.mark.slow
def test_status_pages_in_node_id_order_and_summarises_every_match(fleet):
    _, stub, _, _, _ = fleet
    statuses, summary = every_page(stub, page_size=64, view=ppb.STATUS_VIEW_BRIEF)
    ids = [s.node_id for s in statuses]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == NODES
    assert summary.total == summary.connected == NODES and summary.acked == NODES
    assert not statuses[0].HasField("layout") and statuses[0].labels["class"] in {"phone", "tablet"}
    full = stub.GetPlanStatus(ppb.PlanStatusRequest(page_size=1), timeout=10)
    assert full.executors[0].layout.layers and len(full.executors) == 1 and full.next_page_token


@pytest.mark.slow
def test_a_selector_filters_status_by_labels(fleet):
    _, stub, _, _, _ = fleet
    phones_eu, summary = every_page(stub, selector="class=phone,region=eu", page_size=500)
    assert len(phones_eu) == summary.total == NODES // 3
    assert all(s.labels["class"] == "phone" and s.labels["region"] == "eu" for s in phones_eu)
    not_eu, _ = every_page(stub, selector="region!=eu")
    assert {s.labels["region"] for s in not_eu} == {"us"} and len(not_eu) == NODES // 3


@pytest.mark.slow
@pytest.mark.parametrize("request_fields, field", [
    ({"selector": "class=="}, "selector"),
    ({"selector": "bad key=1"}, "selector"),
    ({"page_token": "!!!"}, "page_token"),
    ({"page_size": 5001}, "page_size"),
])
def test_a_malformed_status_request_names_its_field(fleet, request_fields, field):
    _, stub, _, _, _ = fleet
    with pytest.raises(grpc.RpcError) as error:
        stub.GetPlanStatus(ppb.PlanStatusRequest(**request_fields), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.value.details()


@pytest.mark.slow
def test_a_budget_policy_reaches_only_the_selected_class_as_a_plan_that_carries_it(fleet):
    sim, stub, _, _, _ = fleet
    memory = sim.settings.memory_model
    budget = memory.plan_bytes([1] * memory.layout.num_layers) + 1
    pushed = stub.PushPlan(ppb.PushPlanRequest(selector="class=tablet", budget_bytes=budget,
                                               view=ppb.STATUS_VIEW_BRIEF), timeout=30)
    tablets = {s.node_id: s.desired_plan.version for s in pushed.executors}
    assert len(tablets) == NODES // 3 and all(s.desired_plan.budget_bytes == budget for s in pushed.executors)

    def every_tablet_acked_as_the_planner_sees_it():
        statuses, _ = every_page(stub, view=ppb.STATUS_VIEW_BRIEF)
        return all(s.state == ppb.PLAN_STATE_ACKED and s.acked_plan.version >= tablets[s.node_id]
                   and s.budget_bytes == budget for s in statuses if s.node_id in tablets) and statuses

    statuses = wait_until(every_tablet_acked_as_the_planner_sees_it, timeout=30, what="every tablet's ACK")
    for status in statuses:
        if status.node_id in tablets:
            assert status.budget_bytes == budget and status.state == ppb.PLAN_STATE_ACKED
            assert sum(status.acked_plan.experts_per_layer) == memory.layout.num_layers  # one expert a layer fits
        else:
            assert status.budget_bytes == sim.settings.budget_bytes


@pytest.mark.slow
def test_a_budget_below_what_an_executor_accepts_is_nacked_by_it_and_its_budget_stays(fleet):
    sim, stub, _, _, _ = fleet
    node = sim.node_ids()[1]
    before = stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[node]), timeout=10).executors[0]
    pushed = stub.PushPlan(ppb.PushPlanRequest(node_ids=[node], budget_bytes=1024), timeout=10).executors[0]
    status = wait_until(lambda: (s := stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[node]), timeout=10)
                                 .executors[0]).state == ppb.PLAN_STATE_NACKED and s, timeout=20, what="a NACK")
    assert status.last_result.plan_version == pushed.desired_plan.version and "budget" in status.last_result.reason
    assert status.budget_bytes == before.budget_bytes


@pytest.mark.slow
def test_health_and_status_answer_quickly_while_the_whole_fleet_is_replanned(fleet):
    sim, stub, channel, _, _ = fleet
    health = health_pb2_grpc.HealthStub(channel)
    before = {r.node_id: r.acked_version for r in sim.records()}
    push = stub.PushPlan.future(ppb.PushPlanRequest(view=ppb.STATUS_VIEW_BRIEF), timeout=60)
    slowest = 0.0
    while not push.done():
        start = time.perf_counter()
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        slowest = max(slowest, time.perf_counter() - start)
    assert len(push.result().executors) == NODES
    sim.wait_acked(lambda r: r.acked_version > before[r.node_id], timeout=60)
    assert slowest < 1.0  # a loose bound on a shared machine; the benchmark measures the real figure


@pytest.mark.slow
def test_the_control_port_answers_status_and_pushes_on_threads_and_leaves_connect_to_the_executor_port(fleet):
    sim, stub, _, _, control = fleet
    on_threads = planner_pb2_grpc.PlannerServiceStub(control)
    _, summary = every_page(on_threads, page_size=100, view=ppb.STATUS_VIEW_BRIEF)
    assert summary.total == summary.connected == NODES
    target = sorted(r.node_id for r in sim.records())[:3]
    before = {r.node_id: r.acked_version for r in sim.records()}
    pushed = on_threads.PushPlan(ppb.PushPlanRequest(node_ids=target, view=ppb.STATUS_VIEW_BRIEF), timeout=30)
    assert [s.node_id for s in pushed.executors] == target
    sim.wait_acked(lambda r: r.node_id not in target or r.acked_version > before[r.node_id], timeout=30)
    assert health_pb2_grpc.HealthStub(control).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(on_threads.Connect(iter([ppb.ExecutorMessage()]), timeout=5)))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED and "executor address" in refused.value.details()
    with pytest.raises(grpc.RpcError) as bad:
        on_threads.GetPlanStatus(ppb.PlanStatusRequest(page_size=100_000), timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in bad.value.details()


def test_an_outbox_keeps_only_the_newest_unsent_plan_and_bounds_other_messages():
    box = Outbox()
    box.put_plan(Plan(1, (1, 1)))
    box.put_plan(Plan(2, (2, 2)))
    assert box.take() == Plan(2, (2, 2)) and box.take() is None
    for i in range(MAX_MESSAGES + 1):
        box.put(ppb.PlannerMessage(cancel_profile=str(i)))
    assert [box.take().cancel_profile for _ in range(MAX_MESSAGES)] == [str(i) for i in range(MAX_MESSAGES)]
    with pytest.raises(Ended) as ended:
        box.take()
    assert isinstance(ended.value.error, Overflow)


def test_a_plan_without_a_budget_keeps_the_field_zero_on_the_wire():
    plan = common_pb2.Plan(version=3, experts_per_layer=[1])
    assert plan.budget_bytes == 0
