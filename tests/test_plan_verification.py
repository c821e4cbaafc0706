"""Measured before pushed: where the search's best plans are predicted within E_accuracy's
held-out error of each other, the planner scores them with the profiler's runtime and keeps the
best measured; elsewhere it keeps the search's answer unmeasured."""

import dataclasses

import pytest

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.plan import Strategy
from swapmoe.models.bundled import LM_DIR, PROFILES
from swapmoe.planner_service import profiles
from swapmoe.planner_service.objectives import Prediction
from swapmoe.planner_service.policy import PlannerSettings, PlanPolicy
from swapmoe.planner_service.search import Found, SearchSettings
from swapmoe.planner_service.verification import Verifier, near_ties, verifier_for, verify
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.report import load_device
from swapmoe.profiler.workloads import ProfilingSet

LM = next(PROFILES.iterdir()).name
TINY_SET = dict(kind="lm", texts=1, tokens=24)


def found(perplexity: float, experts=(2, 2)) -> Found:
    return Found(Strategy.MASKED_GATING, 4, experts, Prediction(perplexity, 1e6, 0), 0, "mix", True, 0, rows=1)


def test_only_plans_within_the_models_error_of_the_best_are_near_ties():
    ranked = [found(20.0, (4, 4)), found(20.5, (4, 3)), found(21.5, (3, 4))]
    assert near_ties(ranked, 0.05) == ranked[:2] and near_ties(ranked, 0.1) == ranked


def test_the_best_measured_near_tie_is_kept_and_says_what_was_measured():
    ranked = [found(20.0, (4, 4)), found(20.5, (4, 3)), found(30.0, (1, 1))]
    measured = {(4, 4): 23.0, (4, 3): 21.0}
    asked = []

    def measure(f):
        asked.append(f.experts_per_layer)
        return measured[f.experts_per_layer]
    chosen = verify(ranked, 0.05, measure)
    assert chosen.experts_per_layer == (4, 3) and asked == [(4, 4), (4, 3)]  # the far one is never scored
    assert "measured 21 on the profiling set: best of 2" in chosen.verified and "measured 23" in chosen.verified


def test_with_no_near_tie_nothing_is_measured_and_a_failed_measurement_keeps_the_search_answer():
    ranked = [found(20.0, (4, 4)), found(25.0, (4, 3))]
    chosen = verify(ranked, 0.05, lambda f: pytest.fail("nothing to measure"))
    assert chosen.experts_per_layer == (4, 4) and chosen.verified.startswith("no other plan within")

    def broken(f):
        raise OSError("disk gone")
    chosen = verify([found(20.0, (4, 4)), found(20.1, (4, 3))], 0.05, broken)
    assert chosen.experts_per_layer == (4, 4) and chosen.verified == "not measured: disk gone"


def test_the_verifier_scores_each_configuration_once_with_the_real_runtime():
    verifier = Verifier(LM_DIR, ProfilingSet(**TINY_SET), LM)
    try:
        config = Configuration((8,) * 6, 4)
        first = verifier.accuracy(config, "mix")
        spent = verifier.seconds
        assert first > 1.0 and spent > 0
        assert verifier.accuracy(config, "code") > 1.0 and verifier.seconds == spent  # cached: all workloads at once
    finally:
        verifier.close()


def test_a_checkpoint_of_another_model_is_refused_by_its_fingerprint():
    verifier = Verifier(LM_DIR, ProfilingSet(**TINY_SET), "0123456789abcdef")
    with pytest.raises(ValueError, match="is model e1a419fec4d32150, not 0123456789abcdef"):
        verifier.accuracy(Configuration((8,) * 6, 4), "mix")


def test_a_refined_plan_near_full_residency_is_measured_before_it_is_pushed():
    planner = PlanPolicy(PlannerSettings(profile_devices=False, verify=3, search=SearchSettings(population=16,
                                                                                                generations=8),
                                         frontier_points=3),
                         on_plan_ready=lambda *_: None, connected=lambda _: True, profile=lambda *_: None)
    try:
        planner._accuracy[LM] = dataclasses.replace(planner._accuracy[LM], profiling_set=TINY_SET)
        device = load_device(PROFILES / LM / "devices" / "x86_64-bench", LM)
        memory = MemoryModel(device.layout, Reserve())
        node = planner._node("edge-1", LM, memory)
        planner._search_later = lambda search, node_id, *args: search(node_id, *args)
        planner._ready("edge-1", device, replan=False)
        planner._build("edge-1", "mix", 1)
        budget = memory.plan_bytes([14] * 6) + 1  # near full residency, between two searched budgets
        near = node.frontiers["mix@1"].at(budget)
        planner._refine("edge-1", "mix@1", budget, near)
        chosen = node.frontiers["mix@1"].at(budget)
        # Near full residency the best plans are within the model's error of each other: all measured.
        assert chosen.budget_bytes == budget and chosen.verified.startswith("measured")
        assert chosen.predicted.memory_bytes <= budget and isinstance(chosen.offered_load, int)
        assert Found.from_json(chosen.to_json()) == chosen
        verifier = planner._verifiers[LM]
        assert verifier is not None and verifier.seconds > 0
    finally:
        planner.close()


def test_a_model_whose_checkpoint_is_not_here_is_planned_unverified(caplog):
    accuracy = dataclasses.replace(profiles.find_accuracy([PROFILES])[LM], checkpoint=None)
    assert verifier_for(accuracy) is None
    assert f"plans of model {LM} are not verified: the checkpoint it was profiled with is not on this host" in caplog.text


def test_the_shipped_profile_knows_its_models_error_checkpoint_and_profiling_set():
    accuracy = profiles.find_accuracy([PROFILES])[LM]
    assert accuracy.checkpoint == LM_DIR and accuracy.profiling_set["texts"] == 3
    assert 0.01 < accuracy.held_out_error["mix"] < 0.1
