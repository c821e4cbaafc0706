"""Rows and experts compete for the same bytes, and the planner plans both: a plan's rows are
what its service's offered load pays for, every budget from the executor's minimum gets a
searched plan, and the offered load is read from telemetry without flapping."""

import numpy as np
import pytest

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.planner_service import frontier
from swapmoe.planner_service.objectives import Objectives, Service
from swapmoe.planner_service.search import SearchSettings, exhaustive, search
from swapmoe.planner_service.workload import LoadTracker
from swapmoe.profiler.performance_models import AccuracyModel, LatencyModel
from test_planner_search import MIB, layout

SEQUENCE = MIB // 2  # each sequence past the first
ROWS = 8


def latency(batch=True) -> LatencyModel:
    """10 ms a pass at one row; 8 rows cost 2x one (batching pays), or, unmeasured, 8x."""
    rows, ratio = ((1, 2, 4, 8), (1.0, 1.1, 1.4, 2.0)) if batch else ((), ())
    return LatencyModel(10e6, 10e6, (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), (0, 1e5, 2e5, 6e5, 1.5e6, 3e6), 1.0,
                        (8, 8, 8), rows, ratio)


def accuracy(num_experts, seed: int) -> AccuracyModel:
    """A linear E_accuracy where every expert kept helps (some layers more than others)."""
    rng = np.random.default_rng(seed)
    weights = [-rng.uniform(0.5, 1.5) for _ in num_experts] + [-0.2] * len(num_experts) + [0.0]
    inputs = len(weights)
    return AccuracyModel("mix", tuple(num_experts), (0.0,) * inputs, (1.0,) * inputs,
                         (tuple((w,) for w in weights),), ((0.0,),), y_mean=4.0, y_scale=0.5)


def objectives(seed=0, batch=True) -> Objectives:
    reserve = Reserve(kv_cache_bytes=MIB, batch_bytes=(ROWS - 1) * SEQUENCE, sequence_bytes=SEQUENCE)
    experts = (8, 8, 8)
    histogram = tuple(tuple(np.full(e, 1 / e)) for e in experts)
    return Objectives("mix", MemoryModel(layout(experts), reserve), accuracy(experts, seed), latency(batch),
                      reference_accuracy=20.0, histogram=histogram, load_ns=5e6)


def budget(obj, experts: int, rows: int) -> int:
    return obj.memory.plan_bytes((1, 1, 1), rows) + (experts - 3) * MIB


def target(obj, load: int) -> Service:
    return Service(load, obj.latency_target_ns(Service(load), inflection_ns=10.2e6))


def test_e_memory_counts_each_row_past_the_first():
    memory = objectives().memory
    assert memory.plan_bytes((2, 2, 2), 3) - memory.plan_bytes((2, 2, 2), 1) == 2 * SEQUENCE
    assert memory.plan_bytes((2, 2, 2), 0) == memory.plan_bytes((2, 2, 2), ROWS)  # 0: the full batch
    assert memory.min_budget_bytes == memory.plan_bytes((1, 1, 1), 1)
    assert memory.rows_within((2, 2, 2), memory.plan_bytes((2, 2, 2), 3) + SEQUENCE - 1) == 3


def test_one_stream_spends_nothing_on_rows_and_eight_streams_pay_for_eight():
    obj = objectives()
    at = budget(obj, 12, ROWS)
    alone, busy = (search(obj, at, target(obj, load)) for load in (1, 8))
    assert alone.rows == 1 and busy.rows == 8 and alone.meets_latency and busy.meets_latency
    assert sum(alone.experts_per_layer) > sum(busy.experts_per_layer)  # the rows' bytes went to experts
    assert busy.predicted.throughput > 4 * alone.predicted.throughput
    assert busy.predicted.memory_bytes == obj.memory.plan_bytes(busy.experts_per_layer, 8) <= at


def test_without_a_measured_batch_rows_buy_nothing_and_none_are_paid_for():
    obj = objectives(batch=False)
    assert search(obj, budget(obj, 12, ROWS), Service(8)).rows == 1


def test_a_throughput_target_is_met_with_rows_when_a_budget_holds_them():
    obj = objectives()
    found = search(obj, budget(obj, 10, 4), Service(4, throughput_target=250.0))
    assert found.meets_latency and found.predicted.throughput >= 250.0 and found.rows >= 3


@pytest.mark.parametrize("load", [1, 3, 8])
@pytest.mark.parametrize("experts", [3, 7, 12])
def test_the_search_finds_the_exhaustive_optimum_with_rows(load, experts):
    obj = objectives(seed=load)
    at = budget(obj, experts, load)
    service = target(obj, load)
    best = exhaustive(obj, at, service)
    found = search(obj, at, service, SearchSettings(population=24, generations=30, seed=1, enumerate_below=0))
    assert found.predicted == best.predicted
    assert found.predicted.memory_bytes <= at


def test_every_budget_from_the_one_sequence_minimum_gets_a_searched_plan_within_it():
    obj = objectives()
    built = frontier.build(obj, target(obj, 8), SearchSettings(population=16, generations=8), points=6)
    budgets = [p.budget_bytes for p in built.points]
    assert budgets[0] == obj.memory.min_budget_bytes and budgets[-1] == obj.memory.plan_bytes((8, 8, 8), ROWS)
    for point in built.points:
        assert obj.memory.plan_bytes(point.experts_per_layer, point.rows) <= point.budget_bytes
    assert built.points[0].rows == 1 and built.points[-1].rows == 8
    assert frontier.Frontier.from_json(built.to_json()) == built and built.key == "mix@8"


# --- the offered load ------------------------------------------------------------------
def test_a_steady_load_is_recognised_after_confirmation_and_idle_reports_say_nothing():
    tracker = LoadTracker(max_rows=8, window=3, confirm=3)
    changes = [tracker.observe(running=6, waiting=1) for _ in range(3)]
    assert changes == [False, False, True] and tracker.current == 8
    assert "offered load 1 -> 8 streams" in tracker.why
    assert not any(tracker.observe(0, 0) for _ in range(10)) and tracker.current == 8
    changes = [tracker.observe(1, 0) for _ in range(6)]
    assert changes.count(True) == 1 and tracker.current == 1


def test_a_load_near_a_class_boundary_does_not_flap():
    tracker = LoadTracker(max_rows=8, window=4, confirm=3)
    changes = [tracker.observe(running, 0) for running in [2, 3] * 20]
    assert changes.count(True) == 1 and tracker.current == 4  # means of 2.5: always the class of 4


def test_load_classes_are_powers_of_two_up_to_the_full_batch():
    assert [LoadTracker(6).load_class(n) for n in (0.5, 1, 1.5, 3, 5, 40)] == [1, 1, 2, 4, 6, 6]
