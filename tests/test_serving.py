"""The executor as a long-running service: queueing, deadlines, live plans and budgets while
streaming, a saved plan across restarts, slow subscribers, Prometheus metrics."""

import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swapmoe.core.plan import Plan
from swapmoe.executor import plans
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.prometheus import serve_metrics
from swapmoe.executor.server import serve
from swapmoe.models.tiny import save_tiny_model
from swapmoe.rpc import transport
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, telemetry_pb2 as tpb

LONG = 3000  # tokens: a generation that runs until the test stops it


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """The tiny Mixtral with a context long enough for generations that outlast a test's actions."""
    return save_tiny_model("mixtral", tmp_path_factory.mktemp("long-mixtral"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def served(long_context_model):
    with Engine(EngineConfig(long_context_model, budget_bytes=1 << 30, node_id="serving", max_queue=2,
                             max_batch=1)) as engine:  # one at a time: these tests are about the queue
        server = serve(engine)
        with transport.channel(f"127.0.0.1:{server.port}") as channel:
            yield engine, executor_pb2_grpc.ExecutorServiceStub(channel)
        server.stop(grace=1)


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _idle(engine):
    _wait_until(lambda: engine.running == 0 and engine.queue_depth == 0)


def test_a_full_queue_is_resource_exhausted_and_the_queue_drains_first_come_first_served(served):
    engine, stub = served
    _idle(engine)
    running = stub.Generate(epb.GenerateRequest(text="a", max_new_tokens=LONG), timeout=60)
    next(running)
    finished = []

    def wait_in_line(name):
        chunks = list(stub.Generate(epb.GenerateRequest(text=name, max_new_tokens=2), timeout=60))
        finished.append((name, chunks[-1].usage.completion_tokens))

    waiters = []
    for name in ("first", "second"):  # max_queue=2: both may wait
        waiters.append(threading.Thread(target=wait_in_line, args=(name,)))
        waiters[-1].start()
        _wait_until(lambda n=len(waiters): engine.queue_depth == n)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(epb.GenerateRequest(text="third", max_new_tokens=2), timeout=10))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue 2" in error.value.details()
    running.cancel()
    for thread in waiters:
        thread.join(30)
    assert finished == [("first", 2), ("second", 2)]


def test_a_passed_deadline_stops_the_generation_and_frees_the_executor(served):
    engine, stub = served
    _idle(engine)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(epb.GenerateRequest(text="slow", max_new_tokens=LONG), timeout=0.3))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _idle(engine)
    tokens = engine.stats.tokens_total
    time.sleep(0.2)
    assert engine.stats.tokens_total == tokens, "the generation went on after its deadline"


def test_a_client_that_gives_up_while_queued_leaves_the_queue(served):
    engine, stub = served
    _idle(engine)
    running = stub.Generate(epb.GenerateRequest(text="a", max_new_tokens=LONG), timeout=60)
    next(running)
    queued = stub.Generate(epb.GenerateRequest(text="b", max_new_tokens=2), timeout=60)
    _wait_until(lambda: engine.queue_depth == 1)
    queued.cancel()
    _wait_until(lambda: engine.queue_depth == 0)
    assert engine.running == 1, "the queue emptied by the cancel, not by serving the queued request"
    with pytest.raises(grpc.RpcError) as gave_up:
        next(queued)
    assert gave_up.value.code() == grpc.StatusCode.CANCELLED
    running.cancel()
    _idle(engine)


def test_many_concurrent_streams_all_complete_with_their_own_tokens(long_context_model):
    engine = Engine(EngineConfig(long_context_model, budget_bytes=1 << 30, max_queue=16))
    prompts = [f"prompt number {i}" for i in range(12)]
    expected = {p: [t for c in engine.generate(GenerationRequest(engine.tokenize(p), 6)) for t in c.token_ids]
                for p in prompts}
    server = serve(engine)
    results = {}
    try:
        with transport.channel(f"127.0.0.1:{server.port}") as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)

            def run(prompt):
                chunks = stub.Generate(epb.GenerateRequest(text=prompt, max_new_tokens=6), timeout=60)
                results[prompt] = [t for c in chunks for t in c.token_ids]

            threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    finally:
        server.stop(grace=1)
        engine.close()
    assert results == expected


@pytest.mark.slow
def test_plans_and_budget_cuts_mid_stream_do_not_break_it_and_memory_follows_the_budget(served):
    engine, stub = served
    _idle(engine)
    stream = stub.Generate(epb.GenerateRequest(text="keep going", max_new_tokens=300), timeout=120)
    chunks = [next(stream)]
    layers = engine.layout.num_layers
    version = engine.plan.version
    for counts in ([2] * layers, [6] * layers, [3] * layers):
        version += 1
        result = stub.ApplyPlan(epb.ApplyPlanRequest(plan=common_pb2.Plan(version=version, experts_per_layer=counts)),
                                timeout=10)
        assert result.accepted, result.reason
        chunks.append(next(stream))
    budget = engine.memory_model.plan_bytes([2] * layers)
    reply = stub.SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="another app"), timeout=10)
    assert reply.memory.accounted_bytes <= budget
    chunks += list(stream)
    assert chunks[-1].finish_reason == epb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 300
    assert engine.memory().accounted_bytes <= budget
    stub.SetBudget(epb.SetBudgetRequest(budget_bytes=1 << 30), timeout=10)


def test_a_restarted_executor_resumes_its_last_acknowledged_plan(tiny_model_dir, tmp_path):
    config = EngineConfig(tiny_model_dir, budget_bytes=1 << 30, state_dir=tmp_path)
    with Engine(config) as first:
        layers = first.layout.num_layers
        assert first.apply_plan(Plan(7, (3,) * layers, update_frequency=2, origin="planner:test")).accepted
        assert not first.apply_plan(Plan(5, (2,) * layers)).accepted  # a NACKed plan is not saved
    with Engine(config) as second:
        assert (second.plan.version, second.plan.experts_per_layer, second.plan.update_frequency) == \
            (7, (3,) * layers, 2)
        assert second.achieved == (3,) * layers


def test_a_saved_plan_that_no_longer_fits_is_ignored_with_a_reason(tiny_model_dir, tmp_path):
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30)) as probe:
        layers = probe.layout.num_layers
        small = probe.memory_model.plan_bytes((2,) * layers) - probe.memory_model.reserve.batch_bytes  # one sequence
    plans.save(tmp_path, Plan(9, (8,) * layers))
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=small, state_dir=tmp_path)) as engine:
        assert engine.plan.version == 0 and engine.memory().accounted_bytes <= small
    (tmp_path / plans.FILE).write_text("{not json")
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=1 << 30, state_dir=tmp_path)) as engine:
        assert engine.plan.version == 0


@pytest.mark.slow
def test_a_subscriber_that_stops_reading_neither_stalls_serving_nor_loses_events_silently(served):
    engine, stub = served
    _idle(engine)
    subscription = stub.Subscribe(epb.SubscribeRequest(interval_ms=10), timeout=120)
    next(subscription)  # connected; now it stops reading
    layers = engine.layout.num_layers
    plans = 400
    version = engine.plan.version
    for n in range(plans):  # each applied plan publishes an event
        version += 1
        counts = [2 + n % 3] * layers
        assert stub.ApplyPlan(epb.ApplyPlanRequest(plan=common_pb2.Plan(version=version, experts_per_layer=counts)),
                              timeout=10).accepted
    chunks = list(stub.Generate(epb.GenerateRequest(text="still serving", max_new_tokens=50), timeout=30))
    assert chunks[-1].usage.completion_tokens == 50
    received, dropped = 0, 0
    for event in subscription:  # catch up
        dropped += event.dropped
        if event.WhichOneof("payload") == "event" and event.event.kind == tpb.Event.KIND_PLAN_APPLIED:
            received += 1
            if event.event.plan_version == version:
                break
    subscription.cancel()
    assert received + dropped >= plans  # every plan event arrived or was counted as dropped


def test_prometheus_metrics_use_the_names_serving_dashboards_expect(served):
    engine, stub = served
    _idle(engine)
    list(stub.Generate(epb.GenerateRequest(text="metrics", max_new_tokens=5), timeout=30))
    metrics = serve_metrics(engine, "127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics.server_port}/metrics", timeout=10).read().decode()
    finally:
        metrics.shutdown()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.labels.get("le", "+Inf") == "+Inf" and "code" not in s.labels}
    assert values["swapmoe_generation_tokens_total"] >= 5
    assert values["swapmoe_time_to_first_token_seconds_bucket"] >= 1
    assert values["swapmoe_inter_token_latency_seconds_count"] >= 4
    assert values["swapmoe_num_requests_waiting"] == 0
    assert 0 < values["swapmoe_memory_accounted_bytes"] <= values["swapmoe_memory_budget_bytes"]
    assert values["process_resident_memory_bytes"] > 0
