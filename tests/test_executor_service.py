"""ExecutorService on a real gRPC server on loopback, serving a tiny Mixtral from disk."""

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from swapmoe.executor.requests import GenerationRequest, SamplingParams
from swapmoe.executor.server import SERVICE_NAME
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, telemetry_pb2 as tpb

from serving import own_engine, serving


@pytest.fixture(scope="module")
def service_engine(tiny_model_dir):
    with own_engine(tiny_model_dir, "svc-test") as engine:
        yield engine


@pytest.fixture(scope="module")
def channel(service_engine):
    with serving(service_engine) as channel:
        yield channel


@pytest.fixture
def stub(channel):
    return executor_pb2_grpc.ExecutorServiceStub(channel)


def assert_healthy(channel):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    executor_pb2_grpc.ExecutorServiceStub(channel).Describe(epb.DescribeRequest(), timeout=5)


def next_plan(stub, counts):
    version = stub.Describe(epb.DescribeRequest(), timeout=5).plan.version + 1
    return common_pb2.Plan(version=version, experts_per_layer=counts)


def test_streamed_tokens_equal_in_process_generation(stub, service_engine):
    prompt = "def add(a, b):"
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3)):
        expected = [t for c in service_engine.generate(GenerationRequest(service_engine.tokenize(prompt), 12, sampling))
                    for t in c.token_ids]
        request = epb.GenerateRequest(text=prompt, max_new_tokens=12, sampling=epb.SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed or 0))
        if sampling.seed is None:
            request.sampling.ClearField("seed")
        chunks = list(stub.Generate(request, timeout=30))
        assert [t for c in chunks for t in c.token_ids] == expected
        assert all(len(c.token_ids) == 1 for c in chunks[:-1]), "tokens must stream one by one"
        last = chunks[-1]
        assert last.finish_reason in (epb.FINISH_REASON_LENGTH, epb.FINISH_REASON_EOS)
        assert last.usage.completion_tokens == len(expected)
        assert last.usage.prompt_tokens == len(service_engine.tokenize(prompt))
        assert last.timings.time_to_first_token_ns > 0 and last.timings.total_ns >= last.timings.time_to_first_token_ns


def test_token_id_prompts_and_text_prompts_agree(stub, service_engine):
    ids = list(service_engine.tokenize("hello"))
    by_text = list(stub.Generate(epb.GenerateRequest(text="hello", max_new_tokens=5), timeout=30))
    by_ids = list(stub.Generate(epb.GenerateRequest(token_ids=epb.TokenIds(ids=ids), max_new_tokens=5), timeout=30))
    assert [c.token_ids for c in by_text] == [c.token_ids for c in by_ids]


@pytest.mark.parametrize("request_, field", [
    (epb.GenerateRequest(text=""), "prompt"),
    (epb.GenerateRequest(text="   "), "prompt.text"),
    (epb.GenerateRequest(max_new_tokens=3), "prompt"),
    (epb.GenerateRequest(token_ids=epb.TokenIds(ids=[10**6])), "prompt.token_ids"),
    (epb.GenerateRequest(text="hi", sampling=epb.SamplingParams(temperature=-1)), "sampling.temperature"),
    (epb.GenerateRequest(text="hi", sampling=epb.SamplingParams(top_p=2)), "sampling.top_p"),
    (epb.GenerateRequest(text="hi", max_new_tokens=10**6), "max_new_tokens"),
    (epb.GenerateRequest(text="x" * 5000), "prompt"),
])
def test_bad_generate_requests_are_invalid_argument_naming_the_field(stub, channel, request_, field):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request_, timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()
    assert_healthy(channel)


@pytest.mark.parametrize("counts, field", [
    ([2], "plan.experts_per_layer:"),
    ([2, 2, 2], "plan.experts_per_layer:"),
    ([9, 2], "plan.experts_per_layer[0]"),
    ([2, 0], "plan.experts_per_layer[1]"),
])
def test_malformed_plans_are_invalid_argument_naming_the_field(stub, channel, counts, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.ApplyPlan(epb.ApplyPlanRequest(plan=next_plan(stub, counts)), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()
    assert_healthy(channel)


def test_a_plan_with_more_rows_than_any_executor_decodes_is_invalid_argument_naming_plan_rows(stub, channel):
    plan = next_plan(stub, [2, 2])
    plan.rows = 5000
    with pytest.raises(grpc.RpcError) as error:
        stub.ApplyPlan(epb.ApplyPlanRequest(plan=plan), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "plan.rows: 5000 is outside the allowed range 0 to 4096"
    assert_healthy(channel)
    assert stub.Describe(epb.DescribeRequest(), timeout=5).plan.version == plan.version - 1


def test_a_plan_is_acked_with_what_was_achieved(stub):
    result = stub.ApplyPlan(epb.ApplyPlanRequest(plan=next_plan(stub, [3, 5])), timeout=10)
    assert result.accepted and list(result.achieved_experts_per_layer) == [3, 5]
    assert result.achieved_rows == 8  # rows 0: as many as the budget holds, up to --max-batch
    with_rows = next_plan(stub, [3, 5])
    with_rows.rows = 2
    assert stub.ApplyPlan(epb.ApplyPlanRequest(plan=with_rows), timeout=10).achieved_rows == 2
    assert stub.Describe(epb.DescribeRequest(), timeout=5).plan.rows == 2
    result = stub.ApplyPlan(epb.ApplyPlanRequest(plan=next_plan(stub, [3, 5])), timeout=10)
    assert result.achieved_rows == 8
    assert result.memory.accounted_bytes <= result.memory.budget_bytes
    described = stub.Describe(epb.DescribeRequest(), timeout=5)
    assert described.plan.version == result.plan_version and list(described.achieved_experts_per_layer) == [3, 5]


def test_a_stale_plan_version_is_nacked_with_the_reason(stub):
    current = stub.Describe(epb.DescribeRequest(), timeout=5).plan
    stale = common_pb2.Plan(version=current.version, experts_per_layer=[1, 1])
    result = stub.ApplyPlan(epb.ApplyPlanRequest(plan=stale), timeout=10)
    assert not result.accepted and "not newer" in result.reason


def test_budget_below_the_minimum_is_invalid_argument_and_changes_nothing(stub, channel):
    before = stub.Describe(epb.DescribeRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as error:
        stub.SetBudget(epb.SetBudgetRequest(budget_bytes=before.min_budget_bytes - 1), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("budget_bytes") and "minimum" in error.value.details()
    assert stub.Describe(epb.DescribeRequest(), timeout=5).budget_bytes == before.budget_bytes
    assert_healthy(channel)


def test_a_budget_cut_shrinks_the_plan_to_fit_and_a_plan_over_budget_is_nacked(stub):
    d = stub.Describe(epb.DescribeRequest(), timeout=5)
    per_layer = [l.bytes_per_expert for l in d.layout.layers]
    smallest = [min(l.bytes_per_expert, *(p.bytes_per_expert for p in l.precisions)) for l in d.layout.layers]
    budget = d.min_budget_bytes - sum(smallest) + 2 * sum(per_layer)  # two experts per layer at the checkpoint's
    reply = stub.SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="test"), timeout=10)
    assert reply.budget_bytes == budget and reply.memory.accounted_bytes <= budget
    assert list(reply.achieved_experts_per_layer) == [2, 2]
    result = stub.ApplyPlan(epb.ApplyPlanRequest(plan=next_plan(stub, [8, 8])), timeout=10)
    assert not result.accepted and "budget" in result.reason
    stub.SetBudget(epb.SetBudgetRequest(budget_bytes=1 << 30), timeout=10)


def test_subscribers_receive_events_and_periodic_reports(stub):
    stream = stub.Subscribe(epb.SubscribeRequest(interval_ms=50, topics=[tpb.TOPIC_EVENTS, tpb.TOPIC_MEMORY]))
    received = []
    first = next(stream)  # subscribed: periodic reports start at once
    received.append(first)
    stub.ApplyPlan(epb.ApplyPlanRequest(plan=next_plan(stub, [4, 4])), timeout=10)
    for event in stream:
        received.append(event)
        if any(e.WhichOneof("payload") == "event" for e in received) and len(received) > 3:
            break
    stream.cancel()
    kinds = {e.WhichOneof("payload") for e in received}
    assert kinds == {"event", "memory"}
    applied = [e.event for e in received if e.WhichOneof("payload") == "event"]
    assert applied[0].kind == tpb.Event.KIND_PLAN_APPLIED
    sequences = [e.sequence for e in received]
    assert sequences == list(range(1, len(received) + 1))
    memory = next(e.memory for e in received if e.WhichOneof("payload") == "memory")
    assert memory.process_rss_bytes > 0 and 0 < memory.accounted_bytes <= memory.budget_bytes


def test_expert_telemetry_reports_activations_per_layer(stub):
    stream = stub.Subscribe(epb.SubscribeRequest(interval_ms=50, topics=[tpb.TOPIC_EXPERTS]))
    next(stream)  # baseline
    list(stub.Generate(epb.GenerateRequest(text="import os", max_new_tokens=4), timeout=30))
    report = next(stream).experts
    stream.cancel()
    assert len(report.layers) == 2
    assert sum(sum(layer.activations) for layer in report.layers) > 0


def test_bad_subscribe_requests_are_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as error:
        next(stub.Subscribe(epb.SubscribeRequest(interval_ms=5)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "interval_ms" in error.value.details()


def test_a_cancelled_stream_frees_the_executor_for_the_next_request(stub):
    stream = stub.Generate(epb.GenerateRequest(text="long", max_new_tokens=4000), timeout=60)
    next(stream)
    stream.cancel()
    done = threading.Event()
    result = {}

    def again():
        result["chunks"] = list(stub.Generate(epb.GenerateRequest(text="next", max_new_tokens=3), timeout=30))
        done.set()

    threading.Thread(target=again, daemon=True).start()
    assert done.wait(30), "the cancelled generation kept the executor busy"
    assert result["chunks"][-1].usage.completion_tokens >= 1


@pytest.mark.slow
def test_profile_streams_progress_and_ends_with_measurements(stub):
    progress = list(stub.Profile(epb.ProfileRequest(token_counts=[1, 8], repeats=2), timeout=60))
    assert [p.fraction for p in progress] == sorted(p.fraction for p in progress) and progress[-1].fraction == 1.0
    result = progress[-1].result
    assert result.expert_load_ns > 0 and result.load_bytes_per_second > 0
    assert [c.tokens for c in result.compute] == [1, 8] and all(c.expert_forward_ns > 0 for c in result.compute)


def test_health_and_reflection_answer_for_stock_tools(channel):
    assert_healthy(channel)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    file = database.FindFileContainingSymbol(SERVICE_NAME)
    assert file.package == "swapmoe.v1"
