"""What a hostile or careless client found (issue 12), each reproduced against real servers on
loopback: no single call, idle stream or bad file wedges, poisons or silently corrupts a service."""

from __future__ import annotations

import contextlib
import sqlite3
import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_PLAN_VERSION
from swapmoe.core.plan import Plan
from swapmoe.executor import plans
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.server import serve as serve_executor
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import transport
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until

U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def hostile_engine(tiny_model_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("executor-state")
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="hostile-test", state_dir=state)) as engine:
        yield engine


@pytest.fixture(scope="module")
def executor(hostile_engine):
    server = serve_executor(hostile_engine, max_subscribers=4)
    with transport.channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    server.stop(grace=1)


@pytest.fixture
def stub(executor):
    return executor_pb2_grpc.ExecutorServiceStub(executor)


class Planner:
    """A planner server on loopback that can be restarted on the same port."""

    def __init__(self, state_dir=None):
        self.state_dir = state_dir
        self.server, self.registry = serve_planner(state_dir=state_dir)
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = transport.channel(self.address)

    @property
    def stub(self):
        return planner_pb2_grpc.PlannerServiceStub(self.channel)

    def restart(self, state_dir="same"):
        self.stop()
        self.state_dir = self.state_dir if state_dir == "same" else state_dir
        self.server, self.registry = serve_planner(self.address, state_dir=self.state_dir)
        self.channel = transport.channel(self.address)

    def status(self, node_id):
        """What the planner knows of ``node_id``; None while it knows nothing."""
        try:
            return self.stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[node_id]), timeout=5).executors[0]
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None

    def stop(self):
        self.channel.close()
        self.server.stop(grace=1)


@pytest.fixture
def restartable_planner(tmp_path):
    planner = Planner(tmp_path / "planner-state")
    yield planner
    planner.stop()


class FakeExecutor:
    """A client speaking the executor's side of Connect by hand, as a hostile one would."""

    def __init__(self, planner: Planner, registration: ppb.Registration):
        self.outbox: queue.Queue = queue.Queue()
        self.outbox.put(ppb.ExecutorMessage(registration=registration))
        self.call = planner.stub.Connect(iter(self.outbox.get, None), timeout=30)

    def first(self):
        return next(self.call)

    def close(self):
        self.outbox.put(None)
        self.call.cancel()


def registration_of(engine, node_id="fake", **changes) -> ppb.Registration:
    link = PlannerLink(engine, "unused:1")
    reg = link.registration()
    reg.node_id, reg.node_secret = node_id, ""
    for name, value in changes.items():
        setattr(reg, name, value)
    return reg


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


# 1. One registration wedged the planner: 2^32-1 experts and a 2^64-1 budget held the registry lock.
def test_a_registration_with_huge_counts_is_refused_at_once_and_the_planner_keeps_answering(restartable_planner,
                                                                                            hostile_engine):
    reg = registration_of(hostile_engine, budget_bytes=U64_MAX)
    reg.layout.layers[0].num_experts = 2**32 - 1
    started = time.monotonic()
    error = rpc_error(FakeExecutor(restartable_planner, reg).first)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "registration.layout.layers[0].num_experts" in error.details()
    assert time.monotonic() - started < 5
    reg = registration_of(hostile_engine, budget_bytes=U64_MAX)
    error = rpc_error(FakeExecutor(restartable_planner, reg).first)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "registration.budget_bytes" in error.details()
    assert restartable_planner.stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).executors == []


# 2. One ApplyPlan with version 2^64-1 poisoned control for good.
def test_a_plan_version_past_the_bound_is_invalid_and_later_plans_still_apply(stub):
    error = rpc_error(lambda: stub.ApplyPlan(epb.ApplyPlanRequest(
        plan=common_pb2.Plan(version=U64_MAX, experts_per_layer=[2, 2])), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "plan.version" in error.details()
    version = stub.Describe(epb.DescribeRequest(), timeout=5).plan.version + 1
    assert stub.ApplyPlan(epb.ApplyPlanRequest(plan=common_pb2.Plan(version=version, experts_per_layer=[2, 2])),
                          timeout=5).accepted


def test_a_registration_carrying_a_version_past_the_bound_is_refused(restartable_planner, hostile_engine):
    reg = registration_of(hostile_engine)
    reg.current_plan.version = U64_MAX
    error = rpc_error(FakeExecutor(restartable_planner, reg).first)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "registration.plan.version" in error.details()


def test_a_saved_plan_with_a_version_past_the_bound_is_ignored_at_start(tiny_model_dir, tmp_path):
    plans.save(tmp_path, plans.Plan(MAX_PLAN_VERSION, (2, 2)))
    (tmp_path / plans.FILE).write_text((tmp_path / plans.FILE).read_text().replace(
        str(MAX_PLAN_VERSION), str(U64_MAX)))
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, state_dir=tmp_path)) as engine:
        assert engine.plan.version == 0


# 3. A planner restart replaced an acknowledged operator plan with its own even split.
@pytest.mark.slow
def test_a_restarted_planner_keeps_the_pinned_plan_the_executor_runs(restartable_planner, hostile_engine):
    planner, node = restartable_planner, hostile_engine.config.node_id
    link = PlannerLink(hostile_engine, planner.address).start()
    try:
        wait_until(lambda: (s := planner.status(node)) and s.state == ppb.PLAN_STATE_ACKED, what="the first plan")
        planner.stub.PushPlan(ppb.PushPlanRequest(node_ids=[node], plan=common_pb2.Plan(experts_per_layer=[3, 1])),
                              timeout=5)
        pinned = wait_until(lambda: (s := planner.status(node)).state == ppb.PLAN_STATE_ACKED
                            and list(s.acked_plan.experts_per_layer) == [3, 1] and s, what="the pinned plan")
        running = hostile_engine.plan
        planner.restart()  # same state directory
        after = wait_until(lambda: (s := planner.status(node)).connected and s, what="the resync")
        assert after.pinned and after.acked_plan == pinned.acked_plan
        planner.restart(state_dir=None)  # a planner that lost its state adopts what the executor runs
        after = wait_until(lambda: (s := planner.status(node)) and s.connected and s, what="the resync")
        assert after.acked_plan == pinned.acked_plan and after.state == ppb.PLAN_STATE_ACKED
        time.sleep(0.5)
        assert hostile_engine.plan == running, "the executor was sent another plan"
    finally:
        link.stop()


# 4. 32 idle streams made the executor unresponsive.
def test_idle_streams_past_their_slots_are_refused_and_the_executor_keeps_answering(executor, stub):
    streams = [stub.Subscribe(epb.SubscribeRequest(interval_ms=3_600_000), timeout=60) for _ in range(4)]
    try:
        for stream in streams:
            next(stream)  # each holds its slot now
        error = rpc_error(lambda: next(stub.Subscribe(epb.SubscribeRequest(interval_ms=3_600_000), timeout=10)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Subscribe" in error.details()
        health = health_pb2_grpc.HealthStub(executor).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub.Describe(epb.DescribeRequest(), timeout=2)
        chunks = list(stub.Generate(epb.GenerateRequest(text="still here", max_new_tokens=2), timeout=30))
        assert chunks[-1].usage.completion_tokens == 2
    finally:
        for stream in streams:
            stream.cancel()
    wait_until(lambda: next(stub.Subscribe(epb.SubscribeRequest(interval_ms=10), timeout=10), None),
               what="a freed slot")


@pytest.mark.slow
def test_forty_streams_of_each_kind_leave_health_and_describe_answering(hostile_engine):
    # 32 subscribers, a queue of 64: one caller takes all
    server = serve_executor(hostile_engine, subscribers_per_caller=40)
    with transport.channel(f"127.0.0.1:{server.port}") as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        subscribers = [stub.Subscribe(epb.SubscribeRequest(interval_ms=3_600_000), timeout=120) for _ in range(40)]
        generations = [stub.Generate(epb.GenerateRequest(text=f"client {i}", max_new_tokens=20), timeout=120)
                       for i in range(40)]
        try:
            outcomes = []
            for stream in subscribers:
                try:
                    next(stream)
                    outcomes.append("open")
                except grpc.RpcError as error:
                    outcomes.append(error.code())
            assert outcomes.count("open") == 32 and outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
            started = time.monotonic()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub.Describe(epb.DescribeRequest(), timeout=5)
            assert time.monotonic() - started < 5
            assert all(list(g)[-1].usage.completion_tokens == 20 for g in generations)
        finally:
            for stream in subscribers + generations:
                stream.cancel()
    server.stop(grace=1)


# 5. Profile had no bounds, ignored cancellation and bypassed the generation queue.
@pytest.mark.parametrize("request_, field", [
    (epb.ProfileRequest(repeats=2**32 - 1), "repeats"),
    (epb.ProfileRequest(token_counts=[2**31]), "token_counts[0]"),
    (epb.ProfileRequest(token_counts=list(range(1, 100))), "token_counts"),
])
def test_profile_requests_past_their_bounds_are_invalid(stub, request_, field):
    error = rpc_error(lambda: list(stub.Profile(request_, timeout=10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details()


def test_a_profile_stops_when_its_client_leaves_and_takes_its_turn_in_the_queue(stub, hostile_engine):
    profile = stub.Profile(epb.ProfileRequest(token_counts=[64] * 16, repeats=100), timeout=60)
    next(profile)
    wait_until(lambda: hostile_engine.running == 1, what="the profile's turn")
    profile.cancel()
    wait_until(lambda: hostile_engine.running == 0, timeout=10, what="the profile to stop")


# 7. A directory where the saved plan should be crashed start-up with a traceback.
def test_a_directory_in_place_of_the_saved_plan_is_a_clear_error(tiny_model_dir, tmp_path):
    (tmp_path / plans.FILE).mkdir()
    with pytest.raises(InvalidField, match="state_dir: .*plan.json.* is not a file"):
        Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, state_dir=tmp_path))


# 8. Any client could register under a connected executor's node id and take its stream over.
def test_a_connected_node_id_is_taken_over_only_with_its_secret(restartable_planner, hostile_engine):
    first = FakeExecutor(restartable_planner, registration_of(hostile_engine, "owner"))
    secret = first.first().welcome.node_secret
    assert len(secret) >= 32
    try:
        error = rpc_error(FakeExecutor(restartable_planner, registration_of(hostile_engine, "owner")).first)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "node_secret" in error.details()
        impostor = registration_of(hostile_engine, "owner", node_secret="guess")
        assert rpc_error(FakeExecutor(restartable_planner, impostor).first).code() == grpc.StatusCode.PERMISSION_DENIED
        again = FakeExecutor(restartable_planner, registration_of(hostile_engine, "owner", node_secret=secret))
        assert again.first().welcome.node_secret == secret
        again.close()
    finally:
        first.close()
    def saved_row():
        with contextlib.closing(sqlite3.connect(restartable_planner.state_dir / "planner.db")) as db:
            return db.execute("SELECT record FROM executors WHERE node_id = 'owner'").fetchone()

    (saved,) = wait_until(saved_row, what="the executor's record in the planner's state (written behind)")
    assert secret not in saved, "the planner keeps a digest of the secret, not the secret"


def test_an_executor_keeps_its_secret_in_its_state_directory(restartable_planner, hostile_engine):
    link = PlannerLink(hostile_engine, restartable_planner.address).start()
    try:
        wait_until(link.connected.is_set, what="the connection")
        secret_file = hostile_engine.config.state_dir / "node_secret"
        assert secret_file.read_text() == link.node_secret and secret_file.stat().st_mode & 0o077 == 0
    finally:
        link.stop()
    assert PlannerLink(hostile_engine, restartable_planner.address).node_secret == link.node_secret


# 9. A temperature of 1e-38 gave INTERNAL with torch's message.
@pytest.mark.parametrize("temperature", [1e-38, float("nan"), float("inf"), -1.0, 1e6])
def test_numerically_bad_temperatures_are_invalid(stub, temperature):
    request = epb.GenerateRequest(text="hi", sampling=epb.SamplingParams(temperature=temperature))
    error = rpc_error(lambda: list(stub.Generate(request, timeout=10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.temperature" in error.details()


# Found by the soak: a reader between "budget lowered" and "slots shrunk" saw accounted > budget.
def test_no_reader_ever_sees_accounted_bytes_above_the_budget_while_it_changes(hostile_engine):
    low = hostile_engine.min_budget_bytes + sum(l.bytes_per_expert for l in hostile_engine.layout.layers)
    high, seen, done = hostile_engine.budget_bytes, [], threading.Event()

    def watch():
        while not done.is_set():
            m = hostile_engine.memory()
            seen.append(m.accounted_bytes <= m.budget_bytes)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(20):
            hostile_engine.set_budget(low)
            hostile_engine.apply_plan(hostile_engine.plan.with_version(hostile_engine.plan.version + 1))
            hostile_engine.set_budget(high)
            everything = tuple(layer.num_experts for layer in hostile_engine.layout.layers)
            hostile_engine.apply_plan(Plan(hostile_engine.plan.version + 1, everything))
    finally:
        done.set()
        watcher.join()
    assert len(seen) > 100 and all(seen)
