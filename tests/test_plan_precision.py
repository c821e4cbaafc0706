"""A plan's precision on the executor: the layers hold their experts at the precision the plan
names, the bytes are accounted at it, a budget that holds every expert only at int4 takes an
int4 plan, a budget cut lowers precision only where one expert per layer no longer fits, and a
restart resumes the precision with the plan."""

from __future__ import annotations

import grpc
import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.core.plan import Plan, PlanResult
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest, SamplingParams
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc

from serving import serving

BUDGET = 1 << 30


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=BUDGET, node_id="precision")) as engine:
        yield engine


def everything(engine: Engine) -> tuple[int, ...]:
    return tuple(layer.num_experts for layer in engine.layout.layers)


def apply(engine: Engine, experts: tuple[int, ...], precision: tuple[str, ...] = (), budget_bytes: int = BUDGET
          ) -> PlanResult:
    return engine.apply_plan(Plan(engine.plan.version + 1, experts, 4, precision=precision, budget_bytes=budget_bytes))


def tokens(engine: Engine) -> list[int]:
    """Sampled with a fixed seed: the tiny random model's greedy choice soon meets its end token."""
    request = GenerationRequest((3, 4, 5), max_new_tokens=6, sampling=SamplingParams(temperature=1.0, seed=7))
    return [t for chunk in engine.generate(request) for t in chunk.token_ids]


def test_a_budget_that_holds_every_expert_only_at_int4_refuses_the_checkpoints_precision_and_takes_int4(engine):
    int4 = ("int4",) * engine.layout.num_layers
    budget = engine.memory_model.plan_bytes(everything(engine), 1, int4)
    assert budget < engine.memory_model.plan_bytes(everything(engine), 1)
    refused = apply(engine, everything(engine), budget_bytes=budget)
    assert not refused.accepted and refused.reason.startswith("plan needs")
    result = apply(engine, everything(engine), int4, budget_bytes=budget)
    assert result.accepted and result.achieved_experts_per_layer == everything(engine)
    assert engine.experts.precisions == int4
    memory = engine.memory()
    assert memory.expert_bytes == engine.layout.expert_bytes(everything(engine), int4) + engine.memory_model.reserve.staging_bytes
    assert memory.accounted_bytes <= budget
    assert len(tokens(engine)) == 6


def test_a_layer_back_at_the_checkpoints_precision_generates_what_it_did_before(engine):
    assert apply(engine, everything(engine)).accepted
    before = tokens(engine)
    assert apply(engine, everything(engine), ("int8", "bfloat16")).accepted
    assert engine.experts.precisions == ("int8", "bfloat16")
    assert apply(engine, everything(engine), ("", "")).accepted
    assert engine.experts.precisions == ("", "") and tokens(engine) == before


def test_a_budget_cut_keeps_the_plans_precision_while_one_expert_per_layer_fits_at_it(engine):
    assert apply(engine, everything(engine), ("int4", "int4")).accepted
    half = tuple(k // 2 for k in everything(engine))
    engine.set_budget(engine.memory_model.plan_bytes(half, 1, ("int4", "int4")))
    assert engine.plan.precision == ("int4", "int4") and engine.achieved == half
    assert apply(engine, everything(engine)).accepted  # back under 1 GiB


def test_a_budget_below_one_expert_per_layer_at_the_checkpoints_precision_lowers_the_precision(engine):
    assert apply(engine, everything(engine)).accepted
    smallest = engine.layout.smallest_precision
    assert smallest == ("int4", "int4") and engine.min_budget_bytes == engine.memory_model.plan_bytes((1, 1), 1, smallest)
    native_minimum = engine.memory_model.plan_bytes((1, 1), 1)
    engine.set_budget(native_minimum - 1)
    assert engine.plan.precision == smallest and engine.experts.precisions == smallest
    assert engine.memory().accounted_bytes <= native_minimum - 1
    assert len(tokens(engine)) == 6
    assert apply(engine, everything(engine)).accepted


@pytest.mark.parametrize("precision, field, detail", [
    (("int4",), "plan.precision", "has 1 entries but the model has 2 MoE layers"),
    (("", "int2"), "plan.precision[1]", "'int2' is not a precision layer 1's experts are kept at"),
])
def test_a_precision_the_layers_are_not_kept_at_is_invalid_naming_the_entry(engine, precision, field, detail):
    with pytest.raises(InvalidField) as error:
        apply(engine, everything(engine), precision)
    assert error.value.field == field and detail in error.value.detail


def test_over_grpc_a_plan_names_its_precision_and_a_bad_one_is_invalid_argument(engine):
    with serving(engine) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        described = stub.Describe(epb.DescribeRequest(), timeout=5)
        assert [p.precision for p in described.layout.layers[0].precisions] == ["bfloat16", "int8", "int4"]
        plan = common_pb2.Plan(version=described.plan.version + 1, experts_per_layer=[2, 3], precision=["int4", "int8"])
        assert stub.ApplyPlan(epb.ApplyPlanRequest(plan=plan), timeout=10).accepted
        assert list(stub.Describe(epb.DescribeRequest(), timeout=5).plan.precision) == ["int4", "int8"]
        plan.version += 1
        plan.precision[:] = ["int4", "fp8"]
        with pytest.raises(grpc.RpcError) as error:
            stub.ApplyPlan(epb.ApplyPlanRequest(plan=plan), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("plan.precision[1]: 'fp8' is not a precision")
    assert apply(engine, everything(engine)).accepted


def test_a_restart_resumes_the_plans_precision(tiny_model_dir, tmp_path):
    config = EngineConfig(tiny_model_dir, budget_bytes=BUDGET, node_id="precision-restart", state_dir=tmp_path)
    with Engine(config) as first:
        assert apply(first, (3, 5), ("int4", "bfloat16")).accepted
    with Engine(config) as second:
        assert second.plan.precision == ("int4", "bfloat16") and second.experts.precisions == ("int4", "bfloat16")
        assert second.achieved == (3, 5)


def test_an_executor_started_at_a_precision_starts_its_plan_there_and_refuses_one_it_does_not_keep(tiny_model_dir):
    with Engine(EngineConfig(tiny_model_dir, budget_bytes=BUDGET, node_id="starts-int4", precision="int4")) as engine:
        assert engine.plan.precision == ("int4", "int4") and engine.experts.precisions == ("int4", "int4")
        assert engine.achieved == everything(engine)
    with pytest.raises(InvalidField, match=r"precision: 'int2' is not a precision .* kept: bfloat16, int8, int4"):
        Engine(EngineConfig(tiny_model_dir, budget_bytes=BUDGET, node_id="starts-int2", precision="int2"))
