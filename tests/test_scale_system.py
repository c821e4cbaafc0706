"""The paper-scale system scenario (benchmarks.scale_system) end to end on a shape-scaled OLMoE:
real planner, executor, profiling and gateway processes, so the benchmark's code path works
before it is run at 14 GB."""

from __future__ import annotations

import json

import pytest

from benchmarks import scale_system
from benchmarks.scale_probe import min_budget
from swapmoe.models.paper_scale import parse_scale, write_checkpoint

pytestmark = pytest.mark.slow

EXPERT_BYTES = 3 * 64 * 512 * 2  # gate, up and down projections of 64 x 512 in bfloat16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """OLMoE-1B-7B's code and layout, scaled to 2 layers x 8 experts of 192 KiB."""
    out = tmp_path_factory.mktemp("olmoe-scaled") / "ckpt"
    write_checkpoint("olmoe-1b-7b", out, parse_scale("tiny,hidden_size=64,intermediate_size=512", "olmoe-1b-7b"))
    return out


@pytest.fixture(scope="module")
def scenario(checkpoint, store_root, ray_cluster, tmp_path_factory):
    """The whole scenario, once: budgets of 10 and then 3 experts above the executor's minimum."""
    floor = min_budget(str(checkpoint), str(store_root))["min_budget"]
    work = tmp_path_factory.mktemp("scale-system")
    address = ray_cluster.get_runtime_context().gcs_address
    result = scale_system.main([
        str(checkpoint), "--budget", str(floor + 10 * EXPERT_BYTES), "--second-budget", str(floor + 3 * EXPERT_BYTES),
        "--work", str(work / "run"), "--ray-address", address, "--timeout", "60",
        "--device-repeats", "1", "--sweep-tokens", "8",
        "--report", str(work / "report.md"), "--plans-out", str(work / "plans.json"),
    ])
    return result, work


def steps(result) -> dict:
    return {step["name"]: step for step in result["steps"]}


def test_every_step_of_the_scenario_runs_and_passes(scenario):
    result, work = scenario
    assert [s["name"] for s in result["steps"]] == list(scale_system.Scenario.STEPS)
    assert [(s["name"], s["error"]) for s in result["steps"] if s["error"]] == []
    assert result["passed"], {s["name"]: s["checks"] for s in result["steps"]}
    assert "**Verdict: PASS**" in (work / "report.md").read_text()
    assert json.loads((work / "report.json").read_text())["passed"]


def test_the_searched_plan_is_acked_and_written_for_benchmarks_scale(scenario):
    result, work = scenario
    searched = steps(result)["searched_plan"]
    assert searched["checks"]["searched plan ACKed"]
    assert searched["figures"]["plan"]["origin"].startswith("planner:")
    plans = json.loads((work / "plans.json").read_text())
    budget, second = str(result["settings"]["budget"]), str(result["settings"]["second_budget"])
    assert set(plans) == {budget, second}
    assert plans[budget]["experts_per_layer"] == searched["figures"]["plan"]["experts_per_layer"]
    assert all(p["origin"].startswith("planner:") and p["update_frequency"] >= 0 for p in plans.values())


def test_a_budget_change_mid_stream_loses_no_token_and_is_replanned(scenario):
    result, _ = scenario
    change = steps(result)["budget_change"]
    assert change["checks"]["SetBudget made mid-stream"]
    assert change["checks"]["stream complete, no token lost"]
    assert change["figures"]["stream_tokens"] == change["figures"]["usage_tokens"]
    assert change["checks"]["new budget in force, accounted within it"]
    assert change["figures"]["budget"] == result["settings"]["second_budget"]
    assert change["checks"]["planner's plan for the new budget ACKed, within it"]


def test_a_restarted_executor_resumes_the_planners_plan(scenario):
    result, _ = scenario
    restart = steps(result)["restart"]
    assert restart["checks"]["restart resumed the saved planner's plan"]
    assert restart["figures"]["resumed"]["experts_per_layer"] == restart["figures"]["saved"]["experts_per_layer"]


def test_the_gateway_streams_a_completion_and_profiling_leaves_no_worker(scenario):
    result, _ = scenario
    gateway = steps(result)["gateway"]
    assert gateway["checks"]["gateway answered a streamed completion"] and gateway["figures"]["ttft_s"] > 0
    profiling = steps(result)["accuracy_profile"]
    assert profiling["figures"]["workers_seen"] == 2 and profiling["figures"]["workers_peak_rss"] > 0
    assert profiling["figures"]["left_running"] == []
