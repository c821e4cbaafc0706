"""What the trust review (issue 26) found on the executor, each reproduced against real servers on
loopback: a full disk never cuts an executor off its planner, no file in its state directory fails
later than start-up, no single plan spends the version space, one Profile cannot hold Generate back
for longer than one measurement, and one telemetry client neither takes every Subscribe slot nor
reads other tenants' requests."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_PLAN_VERSION, MAX_SUBSCRIBERS_PER_CALLER, MAX_VERSION_STEP
from swapmoe.core.plan import Plan
from swapmoe.executor import plans
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.prometheus import metrics_registry
from swapmoe.executor.server import serve as serve_executor
from swapmoe.cli.devcerts import make_dev_certs
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import security, transport
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc
from swapmoe.v1 import telemetry_pb2 as tpb

from polling import wait_until
from serving import own_engine, serving


@pytest.fixture(scope="module")
def planner_address_and_stub():
    server, _ = serve_planner(settings=PlannerSettings(profile_devices=False))
    address = f"127.0.0.1:{server.port}"
    with transport.channel(address) as channel:
        yield address, planner_pb2_grpc.PlannerServiceStub(channel)
    server.stop(grace=1)


def planner_status(stub, node_id) -> ppb.ExecutorStatus | None:
    statuses = stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).executors
    return next((s for s in statuses if s.node_id == node_id), None)


def metric(engine, name: str) -> float:
    """One sample of the executor's Prometheus metrics, as a scrape reads it."""
    for line in generate_latest(metrics_registry(engine)).decode().splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


@contextlib.contextmanager
def full_disk(state_dir):
    """Writes of the saved plan fail until the block ends, even for root: the plan's file is a
    directory with something in it, which no rename can replace."""
    blocker = state_dir / plans.FILE
    blocker.mkdir()
    (blocker / "ballast").write_text("x")
    try:
        yield
    finally:
        shutil.rmtree(blocker)


def leftovers(state_dir) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if p.name.startswith("."))


# --- 4. a full disk under --state-dir ----------------------------------------------------------
@pytest.mark.slow
def test_a_plan_that_cannot_be_saved_is_acked_the_link_stays_and_it_is_saved_once_there_is_room(
        tiny_model_dir, tmp_path, planner_address_and_stub):
    address, stub = planner_address_and_stub
    state = tmp_path / "state"
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="full-disk", state_dir=state)) as engine:
        link = None
        try:
            with full_disk(state), serving(engine) as channel:
                link = PlannerLink(engine, address).start()
                acked = wait_until(lambda: (s := planner_status(stub, "full-disk")) and s.connected
                                   and s.state == ppb.PLAN_STATE_ACKED and s, timeout=30, what="the plan's ACK")
                assert acked.acked_plan.version == engine.plan.version > 0
                assert "not saved" in acked.last_result.reason and plans.FILE in acked.last_result.reason
                described = executor_pb2_grpc.ExecutorServiceStub(channel).Describe(epb.DescribeRequest(), timeout=5)
                assert plans.FILE in described.state_error
                assert metric(engine, "swapmoe_state_write_failures_total") >= 1
                assert metric(engine, "swapmoe_state_unsaved_files") == 1
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING  # it serves; it cannot save
                failures = metric(engine, "swapmoe_state_write_failures_total")
                wait_until(lambda: metric(engine, "swapmoe_state_write_failures_total") > failures, timeout=30,
                           what="a retry")
                assert link.connected.is_set() and leftovers(state) == []
            saved = wait_until(lambda: plans.load(state), timeout=30, what="the plan saved once the disk has room")
            assert saved == engine.plan and engine.plan.version == acked.acked_plan.version
            assert metric(engine, "swapmoe_state_unsaved_files") == 0 and leftovers(state) == []
            assert planner_status(stub, "full-disk").connected
        finally:
            if link is not None:
                link.stop()


@pytest.mark.slow
def test_apply_plan_on_a_full_disk_answers_the_ack_it_applied_not_internal(tiny_model_dir, tmp_path):
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="full", state_dir=tmp_path)) as engine:
        with serving(engine) as channel, full_disk(tmp_path):
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            version = engine.plan.version + 1
            answer = stub.ApplyPlan(epb.ApplyPlanRequest(
                plan=common_pb2.Plan(version=version, experts_per_layer=[3, 1])), timeout=10)
            assert answer.accepted and "not saved" in answer.reason
            assert engine.plan.version == version and list(engine.achieved) == [3, 1]
            assert leftovers(tmp_path) == []
        wait_until(lambda: (saved := plans.load(tmp_path)) and saved.version == version, timeout=30,
                   what="the plan saved once the disk has room")


@pytest.mark.parametrize("spoil", [
    lambda path: path.mkdir(),
    lambda path: path.write_bytes(b"\xff\xfe\x00junk"),
    lambda path: path.write_text("two\nlines"),
])
def test_a_node_secret_that_is_not_one_stops_start_up_naming_the_file(tiny_model_dir, tmp_path, spoil):
    spoil(tmp_path / "node_secret")
    with pytest.raises(InvalidField, match="^state_dir: .*node_secret"):
        Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, state_dir=tmp_path))


# --- 5. plan versions ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trusted_engine(tiny_model_dir):
    with own_engine(tiny_model_dir, "trusted") as engine:
        yield engine


@pytest.fixture(scope="module")
def address(trusted_engine):
    server = serve_executor(trusted_engine)
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=1)


@pytest.fixture(scope="module")
def executor(address):
    with transport.channel(address) as channel:
        yield executor_pb2_grpc.ExecutorServiceStub(channel)


def apply(stub, version):
    return stub.ApplyPlan(epb.ApplyPlanRequest(plan=common_pb2.Plan(version=version, experts_per_layer=[2, 2])),
                          timeout=10)


def test_no_single_plan_can_spend_the_version_space(executor, trusted_engine):
    current = trusted_engine.plan.version
    with pytest.raises(grpc.RpcError) as error:
        apply(executor, MAX_PLAN_VERSION)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details().startswith("plan.version")
    assert str(MAX_VERSION_STEP) in error.value.details() and trusted_engine.plan.version == current
    with pytest.raises(grpc.RpcError) as error:
        apply(executor, current + MAX_VERSION_STEP + 1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trusted_engine.plans.check_step(Plan(current + MAX_VERSION_STEP, (2, 2)))  # the longest step there is
    assert apply(executor, current + 1).accepted


def test_a_planner_push_after_a_refused_version_is_applied(trusted_engine, executor, planner_address_and_stub):
    address, stub = planner_address_and_stub
    with pytest.raises(grpc.RpcError):
        apply(executor, MAX_PLAN_VERSION)
    link = PlannerLink(trusted_engine, address).start()
    try:
        assert link.connected.wait(30)
        running = trusted_engine.plan.version
        stub.PushPlan(ppb.PushPlanRequest(node_ids=["trusted"], plan=common_pb2.Plan(experts_per_layer=[3, 1])),
                      timeout=10)
        wait_until(lambda: (s := planner_status(stub, "trusted")).state == ppb.PLAN_STATE_ACKED
                   and s.acked_plan.version > running, timeout=30, what="the pushed plan's ACK")
        assert list(trusted_engine.plan.experts_per_layer) == [3, 1]
    finally:
        link.stop()


# --- 8. one Profile against every Generate ---------------------------------------------------
@pytest.mark.slow
def test_generate_waits_for_one_measurement_of_a_maximal_profile_not_the_whole_profile(trusted_engine, executor,
                                                                                       address):
    request = epb.ProfileRequest(token_counts=[trusted_engine.max_context] * 16, repeats=100,
                                 update_frequencies=list(range(1, 17)), sweep_tokens=trusted_engine.sweep_room)
    profile = executor.Profile(request, timeout=600)
    try:
        # Before the sweep: thread counts and precisions at 100 repeats each (minutes on a loaded machine).
        wait_until(lambda: next(profile).stage.startswith("update-frequency sweep"), timeout=400,
                   what="the profile's sweep")
        with transport.channel(address) as other:  # another client
            started = time.monotonic()
            chunks = list(executor_pb2_grpc.ExecutorServiceStub(other).Generate(
                epb.GenerateRequest(text="meanwhile", max_new_tokens=8), timeout=60))
            waited = time.monotonic() - started
        assert chunks[-1].usage.completion_tokens == 8
        assert waited < 20, f"Generate took {waited:.1f} s behind the profile"
        assert trusted_engine.running >= 1, "the profile carries on"
        assert not next(profile).HasField("result")
    finally:
        profile.cancel()
    wait_until(lambda: trusted_engine.running == 0, timeout=60, what="the profile to stop")


@pytest.mark.slow
def test_a_profile_that_gives_way_still_completes_and_generations_meanwhile_are_unchanged(trusted_engine, executor):
    everything = common_pb2.Plan(version=trusted_engine.plan.version + 1,
                                 experts_per_layer=[layer.num_experts for layer in trusted_engine.layout.layers])
    assert executor.ApplyPlan(epb.ApplyPlanRequest(plan=everything), timeout=10).accepted
    prompt = epb.GenerateRequest(text="def add(a, b):", max_new_tokens=12)

    def loaded() -> bool:  # loads start between passes: generate until every expert is in
        list(executor.Generate(prompt, timeout=60))
        return [len(a.resident) for a in trusted_engine.activity()] == list(everything.experts_per_layer)

    wait_until(loaded, timeout=60, what="every expert loaded (else the first answer routes around a loading one)")
    alone = [t for c in executor.Generate(prompt, timeout=60) for t in c.token_ids]
    outputs, stop = [], threading.Event()

    def generate_meanwhile():
        while not stop.is_set():
            outputs.append([t for c in executor.Generate(prompt, timeout=60) for t in c.token_ids])

    generator = threading.Thread(target=generate_meanwhile)
    generator.start()
    try:
        progress = list(executor.Profile(epb.ProfileRequest(
            token_counts=[1, 4], repeats=3, update_frequencies=[0, 8, 2], sweep_tokens=16,
            experts_per_layer=[2, 2]), timeout=300))
        during = len(outputs)
    finally:
        stop.set()
        generator.join(60)
    result = progress[-1].result
    assert progress[-1].fraction == 1.0 and [p.update_frequency for p in result.sweep] == [0, 8, 2]
    assert len(result.layers) == 2 and result.on_demand.inter_token_ns > 0
    assert list(result.sweep_experts_per_layer) == [2, 2]
    assert during >= 2, "generations ran while the profile measured"
    assert all(out == alone for out in outputs), "generations ran with the plan's experts, all resident"
    assert list(trusted_engine.achieved) == list(trusted_engine.plan.experts_per_layer)


# --- 9. Subscribe per caller, and whose requests a caller sees -------------------------------
@pytest.fixture(scope="module")
def secured(tmp_path_factory, trusted_engine):
    certs = tmp_path_factory.mktemp("certs")
    make_dev_certs(certs)
    server_security = security.server_from_args(argparse.Namespace(security=certs), "executor")
    server = serve_executor(trusted_engine, security=server_security)
    yield certs, f"127.0.0.1:{server.port}"
    server.stop(0)


def stub_as(certs, address, role):
    client = security.client_from_args(argparse.Namespace(security=certs), role, cert="client")
    return executor_pb2_grpc.ExecutorServiceStub(transport.channel(address, client))


def subscribe(stub, *topics, interval_ms=3_600_000):
    return stub.Subscribe(epb.SubscribeRequest(topics=list(topics), interval_ms=interval_ms), timeout=120)


def test_one_caller_holds_a_few_subscribe_slots_and_the_others_stay_free(secured):
    certs, address = secured
    client = stub_as(certs, address, "client")
    held = [subscribe(client, tpb.TOPIC_MEMORY) for _ in range(MAX_SUBSCRIBERS_PER_CALLER)]
    try:
        for stream in held:
            next(stream)
        with pytest.raises(grpc.RpcError) as error:
            next(subscribe(client, tpb.TOPIC_MEMORY))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{MAX_SUBSCRIBERS_PER_CALLER} Subscribe streams" in error.value.details()
        viewer = subscribe(stub_as(certs, address, "viewer"), tpb.TOPIC_MEMORY)
        assert next(viewer).HasField("memory")
        viewer.cancel()
    finally:
        for stream in held:
            stream.cancel()
    wait_until(lambda: next(subscribe(client, tpb.TOPIC_MEMORY, interval_ms=10), None), timeout=30,
               what="a freed slot")


def test_only_control_and_viewer_callers_see_requests_and_expert_counts(secured):
    certs, address = secured
    client, viewer, control = (stub_as(certs, address, role) for role in ("client", "viewer", "control"))
    watched = {role: subscribe(stub, tpb.TOPIC_EVENTS) for role, stub in (("client", client), ("viewer", viewer))}
    try:
        time.sleep(0.5)  # both subscriptions are in place before the request
        list(client.Generate(epb.GenerateRequest(text="private", max_new_tokens=2, request_id="tenant-a"), timeout=60))
        control.SetBudget(epb.SetBudgetRequest(budget_bytes=1 << 30, reason="marker"), timeout=10)

        def until_marker(stream):
            seen = []
            for event in stream:
                seen.append(event.event)
                if event.event.kind == tpb.Event.KIND_BUDGET_CHANGED and "marker" in event.event.message:
                    return seen
        seen = {role: until_marker(stream) for role, stream in watched.items()}
    finally:
        for stream in watched.values():
            stream.cancel()
    assert any(e.request_id == "tenant-a" for e in seen["viewer"])
    assert not any(e.kind == tpb.Event.KIND_REQUEST_FINISHED or "tenant-a" in e.message for e in seen["client"])
    with pytest.raises(grpc.RpcError) as error:
        next(subscribe(client, tpb.TOPIC_EXPERTS))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and "topics" in error.value.details()
    everything = subscribe(client, interval_ms=10)
    try:
        kinds = {next(everything).WhichOneof("payload") for _ in range(8)}
    finally:
        everything.cancel()
    assert "memory" in kinds and "experts" not in kinds
    experts = subscribe(viewer, tpb.TOPIC_EXPERTS, interval_ms=10)
    assert next(experts).HasField("experts")
    experts.cancel()
