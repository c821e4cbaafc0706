"""The plan policy's own rules, without servers: which profiles it knows and which frontier it
searches next."""

from swapmoe.models.bundled import PROFILES
from swapmoe.planner_service.policy import PlannerSettings, PlanPolicy, _Node
from swapmoe.planner_service.workload import WorkloadTracker

LM = next(PROFILES.iterdir()).name  # the bundled LM's fingerprint


def policy(**settings) -> PlanPolicy:
    return PlanPolicy(PlannerSettings(profile_devices=False, **settings), on_plan_ready=lambda *_: None,
                      connected=lambda _: True, profile=lambda *_: None)


def test_a_planner_given_no_roots_knows_the_profile_shipped_with_the_bundled_model():
    shipped, without = policy(), policy(shipped_profiles=False)
    try:
        assert LM in shipped._accuracy and LM not in without._accuracy
    finally:
        shipped.close()
        without.close()


def test_the_frontier_searched_next_is_the_recognised_workloads_then_the_defaults_then_by_name():
    planner = policy()
    node = planner._nodes["edge-1"] = _Node(LM, None, "ready", dict.fromkeys(["code", "manual", "mix", "prose"]))
    node.tracker = WorkloadTracker({}, current="prose")
    built = []

    def build(node_id, workload):
        built.append(workload)
        node.frontiers[workload] = object()
        if workload == "prose":
            node.tracker.current = "manual"  # a shift seen while the first frontier was searched

    planner._build, planner._search_later = build, lambda search, node_id, *args: search(node_id, *args)
    try:
        planner._build_missing("edge-1")
        assert built == ["prose", "manual", "mix", "code"]
    finally:
        planner.close()
