"""Precision is a plan dimension: the planner searches experts per layer and their precision
together under the budget, counts their bytes with the executor's own memory model, predicts
their accuracy and speed, and answers a budget by lowering precision or the count, whichever
the models predict loses less."""

import dataclasses

import numpy as np
import pytest

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import Strategy, validate_plan
from swapmoe.planner_service.objectives import Objectives, Service, e_memory_many
from swapmoe.planner_service.search import Found, SearchSettings, _PlanProblem, exhaustive, search
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.performance_models import AccuracyModel
from test_planner_search import MIB, latency_model, objectives as plain_objectives

KIB = 1 << 10
# A 1 MiB float32 expert at each lower precision the store keeps (int4: 4 bits and scales).
LOWER = (("bfloat16", 512 * KIB), ("int8", 264 * KIB), ("int4", 160 * KIB))
NAMES = tuple(p for p, _ in LOWER)
EXPERTS = (8, 8, 8)
MG = Strategy.MASKED_GATING


def layout(experts=EXPERTS) -> ModelLayout:
    return ModelLayout("mixtral", "MixtralForCausalLM",
                       tuple(LayerLayout(i, f"layers.{i}", e, 2, MIB, LOWER) for i, e in enumerate(experts)), 8 * MIB)


def accuracy(cost: dict[str, float], experts=EXPERTS, precisions=NAMES) -> AccuracyModel:
    """A linear E_accuracy (log perplexity around 20): every expert kept helps, and each layer at a
    lower precision adds ``cost[precision]`` (``precisions`` empty: a model profiled before them)."""
    layers = len(experts)
    weights = [0.0] * layers + [-1.0] * layers + [0.0] + [cost.get(p, 0.0) for _ in experts for p in precisions]
    inputs = len(weights)
    return AccuracyModel("mix", tuple(experts), (0.0,) * inputs, (1.0,) * inputs, (tuple((w,) for w in weights),),
                         ((0.0,),), y_mean=float(np.log(20.0)), y_scale=1.0, precisions=precisions)


def objectives(cost: dict[str, float], experts=EXPERTS) -> Objectives:
    """Virtual experts only: on demand would be exact at any budget here (no latency target)."""
    uniform = tuple(tuple([1 / e] * e) for e in experts)
    return Objectives("mix", MemoryModel(layout(experts), Reserve(kv_cache_bytes=MIB)), accuracy(cost, experts),
                      latency_model(experts), reference_accuracy=20.0, histogram=uniform, load_ns=4e5,
                      strategies=(MG,))


def all_at(precision: str, experts=EXPERTS) -> tuple[str, ...]:
    return (precision,) * len(experts)


def int4_budget(obj: Objectives) -> int:
    """Every expert fits at int4, and at no other precision."""
    return obj.memory.plan_bytes(obj.num_experts, precision=all_at("int4"))


# --- the search space ---------------------------------------------------------------------
def test_the_precisions_searched_are_those_the_executor_keeps_and_e_accuracy_knows_most_bytes_first():
    assert objectives({}).precisions == ("", "bfloat16", "int8", "int4")
    older = dataclasses.replace(objectives({}), accuracy=accuracy({}, precisions=()))
    assert older.precisions == ("",)  # a profile scored before precisions: nothing it cannot predict
    assert search(older, int4_budget(older)).precision == ()


def test_a_layout_without_precisions_is_searched_without_precision_genes():
    obj = plain_objectives()
    problem = _PlanProblem(obj, obj.memory.plan_bytes(obj.num_experts), Service())
    assert problem.n_var == 3 + len(obj.num_experts) and obj.precisions == ("",)
    assert search(obj, obj.memory.fixed_bytes + 7 * MIB).precision == ()


def test_vectorised_e_memory_with_precision_is_the_executors_own_accounting():
    obj = objectives({})
    rng = np.random.default_rng(0)
    kept = rng.integers(1, 9, (40, 3))
    rows = rng.integers(0, 3, 40)
    codes = rng.integers(0, 4, (40, 3))
    expected = [obj.memory.plan_bytes(k, r, [obj.precisions[c] for c in p]) for k, r, p in zip(kept, rows, codes)]
    assert e_memory_many(obj.memory, kept, rows, codes, obj.precisions).tolist() == expected


# --- what the search picks ------------------------------------------------------------------
@pytest.mark.parametrize("int4_cost, picks_int4", [(0.01, True), (3.0, False)])
def test_a_budget_that_holds_every_expert_only_at_int4_is_spent_on_whichever_loses_less(int4_cost, picks_int4):
    """Where int4 costs little, every expert at int4; where it costs more than experts do, fewer
    experts at a higher precision. Either way the plan fits the budget by the executor's memory model."""
    obj = objectives({"bfloat16": 0.001, "int8": 0.005, "int4": int4_cost})
    budget = int4_budget(obj)
    found = search(obj, budget)
    assert ("int4" in found.precision) is picks_int4
    if picks_int4:
        assert found.precision == all_at("int4") and found.experts_per_layer == obj.num_experts
    else:
        assert sum(found.experts_per_layer) < sum(obj.num_experts)
    assert obj.memory.over_budget(found.experts_per_layer, budget, found.precision) == ""
    assert found.predicted.memory_bytes == obj.memory.plan_bytes(found.experts_per_layer, 0, found.precision) <= budget
    plan = found.plan(3, found.origin(budget))
    validate_plan(plan, obj.memory.layout)
    assert plan.precision == found.precision
    assert found.plan(3, "x") == exhaustive(obj, budget).plan(3, "x")  # the optimum of the whole space


def test_a_budget_below_one_expert_per_layer_at_the_checkpoints_precision_still_gets_a_plan():
    obj = objectives({"bfloat16": 0.001, "int8": 0.005, "int4": 0.05})
    budget = obj.memory.plan_bytes((1, 1, 1), precision=all_at("int8")) + 10 * KIB
    assert obj.memory.over_budget((1, 1, 1), budget)  # the checkpoint's precision cannot hold one per layer
    found = search(obj, budget, settings=SearchSettings(enumerate_below=0))
    assert obj.memory.over_budget(found.experts_per_layer, budget, found.precision) == ""
    assert set(found.precision) <= {"int8", "int4"}


@pytest.mark.parametrize("seed", range(3))
def test_the_genetic_search_with_precision_genes_never_returns_a_plan_over_its_budget(seed):
    rng = np.random.default_rng(seed)
    cost = dict(zip(NAMES, rng.uniform(0, 0.5, 3)))
    obj = objectives(cost, experts=(16, 12, 16, 8))
    for share in (0.15, 0.4, 0.8):
        budget = obj.memory.min_budget_bytes + int(share * (obj.memory.plan_bytes(obj.num_experts)
                                                            - obj.memory.min_budget_bytes))
        found = search(obj, budget, settings=SearchSettings(population=24, generations=15, seed=seed,
                                                             enumerate_below=0))
        assert obj.memory.plan_bytes(found.experts_per_layer, 0, found.precision) <= budget
        assert found.predicted == obj.predict_one(found.strategy, found.update_frequency, found.experts_per_layer,
                                                  found.rows, precision=found.precision)


def test_a_found_plan_with_precision_round_trips_and_is_reproducible_for_a_seed():
    obj = objectives({"int4": 0.01})
    settings = SearchSettings(population=16, generations=8, enumerate_below=0)
    found = search(obj, int4_budget(obj), settings=settings)
    assert Found.from_json(found.to_json()) == found
    assert search(obj, int4_budget(obj), settings=settings) == found
    assert "precision=" in found.origin(int4_budget(obj))


# --- the predictions ------------------------------------------------------------------------
def test_a_lower_precision_never_predicts_better_than_the_checkpoints_and_full_residency_at_it_is_not_exact():
    obj = objectives({"int4": -0.3})  # a model that thinks int4 helps (noise near full residency can)
    full = obj.num_experts
    assert obj.predict_one(MG, 4, full).accuracy == obj.reference_accuracy  # exact: the full model
    at_int4 = obj.predict_one(MG, 4, (4, 4, 4), precision=all_at("int4")).accuracy
    assert at_int4 == obj.predict_one(MG, 4, (4, 4, 4)).accuracy
    lossy = dataclasses.replace(objectives({"int4": 0.2}), strategies=(MG, Strategy.ON_DEMAND))
    assert lossy.predict_one(MG, 4, full, precision=all_at("int4")).accuracy > lossy.reference_accuracy
    # On demand at int4 serves every expert at int4: the full model at int4, not the exact reference.
    assert lossy.predict_one(Strategy.ON_DEMAND, 0, (1, 1, 1), precision=all_at("int4")).accuracy == \
        pytest.approx(float(lossy.accuracy.predict([Configuration(full, 0, all_at("int4"))])[0]))


def test_e_latency_runs_a_pass_at_the_measured_precision_speed_and_loads_fewer_bytes():
    obj = objectives({})
    timed = dataclasses.replace(obj, latency=dataclasses.replace(
        obj.latency, precision_names=NAMES, precision_ratio=(0.9, 0.8, 0.7), precision_bytes=(0.5, 0.26, 0.16)))
    native = timed.predict_one(MG, 0, (8, 8, 8)).inter_token_ns
    assert timed.predict_one(MG, 0, (8, 8, 8), precision=all_at("int4")).inter_token_ns == pytest.approx(0.7 * native)
    mixed = timed.predict_one(MG, 0, (8, 8, 8), precision=("int4", "", "")).inter_token_ns
    assert mixed == pytest.approx(native * (1 - 0.3 / 3))  # each layer its share of the difference
    updating = [timed.predict_one(MG, 2, (4, 4, 4), precision=all_at(p)).inter_token_ns for p in ("", "int4")]
    overhead = [u - timed.predict_one(MG, 0, (4, 4, 4), precision=all_at(p)).inter_token_ns
                for u, p in zip(updating, ("", "int4"))]
    assert overhead[1] == pytest.approx(0.16 * overhead[0])  # updates load int4's bytes
    # A profile without precision points predicts every precision at the checkpoint's speed.
    assert obj.predict_one(MG, 0, (8, 8, 8), precision=all_at("int4")).inter_token_ns == \
        pytest.approx(obj.predict_one(MG, 0, (8, 8, 8)).inter_token_ns)
