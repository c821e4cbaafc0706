"""The planner's search, against the performance models: it finds the optimum where every
configuration can be enumerated, never returns a plan over its budget, answers every budget
from its frontier, and recognises workloads without flapping."""

import numpy as np
import pytest

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import Strategy
from swapmoe.planner_service import frontier
from swapmoe.planner_service.objectives import (Objectives, Service, e_memory_many, inflection_latency_ns,
                                                lru_miss_ratios)
from swapmoe.planner_service.search import Found, SearchSettings, exhaustive, search
from swapmoe.planner_service.workload import Hysteresis, WorkloadTracker
from swapmoe.profiler.performance_models import AccuracyModel, LatencyModel

MIB = 1 << 20


def layout(experts=(4, 4, 4), sizes=None) -> ModelLayout:
    sizes = sizes or [MIB] * len(experts)
    return ModelLayout("mixtral", "MixtralForCausalLM",
                       tuple(LayerLayout(i, f"layers.{i}", e, 2, b) for i, (e, b) in enumerate(zip(experts, sizes))),
                       8 * MIB)


def random_network(num_experts, seed: int, workload: str = "mix") -> AccuracyModel:
    """An E_accuracy with random weights: a rugged landscape nothing about the search assumes."""
    rng = np.random.default_rng(seed)
    inputs = 2 * len(num_experts) + 1
    return AccuracyModel(workload, tuple(num_experts), (0.0,) * inputs, (1.0,) * inputs,
                         (tuple(map(tuple, rng.normal(size=(inputs, 8)))), tuple(map(tuple, rng.normal(size=(8, 1))))),
                         (tuple(rng.normal(size=8)), (0.0,)), y_mean=4.0, y_scale=0.5)


def latency_model(num_experts) -> LatencyModel:
    return LatencyModel(10e6, 10e6, (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), (0, 1e5, 2e5, 6e5, 1.5e6, 3e6), 1.0,
                        tuple(num_experts))


def objectives(seed=0, experts=(4, 4, 4), sizes=None, load_ns=4e5, skew=2.0) -> Objectives:
    model = layout(experts, sizes)
    rng = np.random.default_rng(seed + 100)
    histogram = tuple(tuple(rng.dirichlet(np.full(e, 1 / skew))) for e in experts)
    return Objectives("mix", MemoryModel(model, Reserve(kv_cache_bytes=MIB)), random_network(experts, seed),
                      latency_model(experts), reference_accuracy=20.0, histogram=histogram, load_ns=load_ns)


def seeds(fast: int, total: int) -> list:
    """Seeds ``0..total-1``; those past the first ``fast`` run only in the slow tier (``-m slow``)."""
    return [*range(fast), *(pytest.param(s, marks=pytest.mark.slow) for s in range(fast, total))]


@pytest.mark.parametrize("seed", seeds(1, 3))
@pytest.mark.parametrize("experts_kept", [7, 10, 12])
@pytest.mark.parametrize("target_ms", [None, 10.2, 11.0])
def test_the_search_finds_the_exhaustive_optimum_of_a_small_space(seed, experts_kept, target_ms):
    obj = objectives(seed, sizes=[MIB, 2 * MIB, MIB])
    budget = obj.memory.fixed_bytes + experts_kept * MIB
    target = Service(latency_target_ns=target_ms * 1e6 if target_ms else None)
    best = exhaustive(obj, budget, target)
    found = search(obj, budget, target, SearchSettings(population=24, generations=25, seed=seed, enumerate_below=0))
    assert (found.strategy, found.update_frequency, found.experts_per_layer) == \
        (best.strategy, best.update_frequency, best.experts_per_layer)
    assert found.predicted == best.predicted


@pytest.mark.parametrize("seed", seeds(3, 12))
def test_the_search_never_returns_a_plan_over_its_budget_or_past_a_target_it_claims_to_meet(seed):
    rng = np.random.default_rng(seed)
    experts = tuple(int(e) for e in rng.integers(2, 17, rng.integers(1, 7)))
    sizes = [int(s) for s in rng.integers(MIB // 4, 2 * MIB, len(experts))]
    obj = objectives(seed, experts, sizes)
    budget = int(rng.integers(obj.memory.min_budget_bytes, obj.memory.plan_bytes(experts) + MIB))
    target = float(rng.uniform(9e6, 12e6))
    found = search(obj, budget, Service(latency_target_ns=target), SearchSettings(population=16, generations=8, seed=seed, enumerate_below=0))
    assert found.predicted.memory_bytes == obj.memory.plan_bytes(found.experts_per_layer) <= budget
    assert all(1 <= k <= e for k, e in zip(found.experts_per_layer, experts))
    if found.meets_latency:
        assert found.predicted.inter_token_ns <= target
    else:  # nothing met the target: the target loosened by 25% steps until a plan did, so within 25% of the fastest
        fastest = obj.predict_one(Strategy.MASKED_GATING, 32, (1,) * len(experts)).inter_token_ns
        assert target < found.predicted.inter_token_ns < 1.25 * max(fastest, target) + 1e-6


def test_the_search_is_reproducible_for_a_seed_and_carries_its_predictions():
    obj = objectives(1, experts=(8, 8, 8, 8))
    budget = obj.memory.fixed_bytes + 14 * MIB
    a, b = (search(obj, budget, Service(latency_target_ns=10.5e6), SearchSettings(seed=3, enumerate_below=0)) for _ in range(2))
    assert a == b
    assert a.predicted == obj.predict_one(a.strategy, a.update_frequency, a.experts_per_layer)
    assert a.budget_bytes == budget and a.workload == "mix" and a.evaluated > 100
    assert Found.from_json(a.to_json()) == a


def test_a_small_space_is_enumerated_instead_of_searched():
    obj = objectives(0)
    budget = obj.memory.fixed_bytes + 8 * MIB
    service = Service(latency_target_ns=10.5e6)
    assert search(obj, budget, service) == exhaustive(obj, budget, service)


def test_a_budget_below_the_smallest_plan_is_refused():
    obj = objectives()
    with pytest.raises(ValueError, match=r"below the smallest plan's \d+ \(one expert per layer and one sequence\)"):
        search(obj, obj.memory.min_budget_bytes - 1)


def test_on_demand_wins_where_misses_are_cheap_and_virtual_experts_where_they_are_dear():
    """The device profile decides the strategy: the same model on a fast tier is served exactly,
    on a slow one by virtual experts."""
    budget = lambda o: o.memory.fixed_bytes + 8 * MIB  # noqa: E731 - 8 of 12 experts
    cheap, dear = objectives(0, load_ns=1e4), objectives(0, load_ns=5e6)
    target = Service(latency_target_ns=inflection_latency_ns(cheap.latency, 16))
    assert search(cheap, budget(cheap), target).strategy is Strategy.ON_DEMAND
    chosen = search(dear, budget(dear), target)
    assert chosen.strategy is Strategy.MASKED_GATING and chosen.update_frequency >= 16


def test_on_demand_is_exact_and_virtual_experts_never_predict_better_than_the_full_model():
    obj = objectives(2)
    full = obj.num_experts
    assert obj.predict_one(Strategy.ON_DEMAND, 0, (1, 1, 1)).accuracy == obj.reference_accuracy
    assert obj.predict_one(Strategy.MASKED_GATING, 4, full).accuracy == obj.reference_accuracy
    kept = np.array([[k1, k2, k3] for k1 in range(1, 5) for k2 in range(1, 5) for k3 in range(1, 5)])
    accuracy, *_ = obj.predict(np.zeros(len(kept), dtype=int), np.full(len(kept), 8), np.ones(len(kept), dtype=int), kept)
    assert (accuracy >= obj.reference_accuracy).all()


def test_vectorised_e_memory_is_the_executors_own_accounting():
    obj = objectives(0, experts=(8, 4, 16), sizes=[MIB, 3 * MIB, MIB // 2])
    rng = np.random.default_rng(0)
    kept = np.stack([rng.integers(1, e + 1, 50) for e in (8, 4, 16)], axis=1)
    rows = rng.integers(0, 3, 50)
    assert e_memory_many(obj.memory, kept, rows).tolist() == \
        [obj.memory.plan_bytes(k, r) for k, r in zip(kept.tolist(), rows.tolist())]


def test_lru_miss_ratio_is_exact_for_uniform_routing_and_falls_with_more_slots():
    assert np.allclose(lru_miss_ratios([0.25] * 4, 5), [1.0, 0.75, 0.5, 0.25, 0.0])
    skewed = lru_miss_ratios([0.7, 0.2, 0.05, 0.05], 5)
    assert (np.diff(skewed) <= 1e-12).all() and skewed[1] < 0.75 and skewed[4] == 0.0


# --- the frontier ---------------------------------------------------------------------
def test_the_frontier_answers_any_budget_with_a_searched_plan_that_fits_it():
    obj = objectives(0, experts=(8, 8, 8))
    built = frontier.build(obj, Service(latency_target_ns=11e6), SearchSettings(population=16, generations=8), points=6)
    budgets = [p.budget_bytes for p in built.points]
    assert budgets == sorted(budgets) and budgets[0] == obj.memory.min_budget_bytes
    assert budgets[-1] == obj.memory.plan_bytes((8, 8, 8))
    rng = np.random.default_rng(0)
    for budget in rng.integers(obj.memory.min_budget_bytes, budgets[-1] + 4 * MIB, 40):
        answer = built.at(int(budget))
        assert answer.predicted.memory_bytes <= budget
        assert answer.budget_bytes == max(b for b in budgets if b <= budget)
    assert built.at(obj.memory.min_budget_bytes - 1) is None
    assert frontier.Frontier.from_json(built.to_json()) == built


# --- workload recognition -------------------------------------------------------------
HISTOGRAMS = {
    "code": [[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]],
    "prose": [[0.1, 0.1, 0.2, 0.6], [0.6, 0.2, 0.1, 0.1]],
}
HISTOGRAMS["mix"] = (np.add(HISTOGRAMS["code"], HISTOGRAMS["prose"]) / 2).tolist()


def report(workload: str, tokens: int, rng) -> list[list[int]]:
    return [rng.multinomial(tokens, layer).tolist() for layer in HISTOGRAMS[workload]]


def test_a_stream_of_one_domain_is_recognised_and_a_change_of_domain_is_followed():
    rng = np.random.default_rng(0)
    tracker = WorkloadTracker(HISTOGRAMS, Hysteresis(window=3, min_tokens=32, confirm=3))
    changes = [tracker.observe(report("code", 40, rng)) for _ in range(3)]
    assert tracker.current == "code" and changes.count(True) == 1
    assert "fit 'code' best" in tracker.why
    changes = [tracker.observe(report("prose", 40, rng)) for _ in range(6)]
    assert tracker.current == "prose" and changes.count(True) == 1  # not through the mix on the way


def test_a_mixed_stream_settles_on_the_mix_and_does_not_flap():
    rng = np.random.default_rng(1)
    tracker = WorkloadTracker(HISTOGRAMS, Hysteresis(window=4, min_tokens=32, confirm=2))
    changes = [tracker.observe(report("code" if i % 2 else "prose", 20, rng)) for i in range(60)]
    assert tracker.current == "mix" and changes.count(True) == 1


def test_no_decision_is_made_on_too_few_tokens_or_a_report_of_another_layout():
    rng = np.random.default_rng(2)
    tracker = WorkloadTracker(HISTOGRAMS, Hysteresis(window=3, min_tokens=100))
    assert not tracker.observe(report("code", 20, rng)) and tracker.current == ""
    assert not tracker.observe([[1, 2, 3]]) and tracker.current == ""
