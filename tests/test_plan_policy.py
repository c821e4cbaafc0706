"""The plan policy's own rules, without servers: which profiles it knows and which frontier it
searches next."""

from swapmoe.models.bundled import PROFILES
from swapmoe.planner_service import frontier
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

    def build(node_id, workload, load):
        built.append(workload)
        node.frontiers[frontier.key(workload, load)] = object()
        if workload == "prose":
            node.tracker.current = "manual"  # a shift seen while the first frontier was searched

    planner._build, planner._search_later = build, lambda search, node_id, *args: search(node_id, *args)
    try:
        planner._build_missing("edge-1")
        assert built == ["prose", "manual", "mix", "code"]
    finally:
        planner.close()


def test_a_shift_of_offered_load_is_answered_with_the_rows_that_load_pays_for():
    from types import SimpleNamespace
    from test_planner_rows import ROWS, budget, objectives

    from swapmoe.planner_service.search import SearchSettings

    planner, obj = policy(search=SearchSettings(population=16, generations=10), frontier_points=4), objectives()
    record = SimpleNamespace(node_id="edge-1", budget_bytes=budget(obj, 12, ROWS), workload="mix",
                             registration=SimpleNamespace(model_fingerprint=LM), memory_model=obj.memory)
    node = planner._node("edge-1", LM, obj.memory)
    node.profile_state, node.objectives, node.inflection_ns = "ready", {"mix": obj}, 10.2e6
    planner._search_later = lambda search, node_id, *args: search(node_id, *args)
    try:
        planner._build_missing("edge-1")
        assert planner.choose(record, "registered").plan.rows == 1  # one stream: every byte to experts
        whys = [planner.observe_load(record, running=8, waiting=2) for _ in range(node.load.confirm)]
        assert whys[:-1] == [None] * (node.load.confirm - 1) and "offered load 1 -> 8 streams" in whys[-1]
        choice = planner.choose(record, whys[-1])  # the load-8 frontier is searched, then answers
        assert set(node.frontiers) == {"mix@1", "mix@8"}
        assert planner.choose(record, "replan").plan.rows == ROWS
        assert "at 8 streams" in planner.choose(record, "replan").reason and choice.plan.rows in (1, ROWS)
    finally:
        planner.close()


def test_a_budget_cut_is_answered_with_a_plan_whose_experts_at_their_precision_fit_it():
    """The executor keeps its experts at lower precisions too (its registration says their bytes): the
    frontier answers a cut to half the float32 model's bytes with a searched plan that lowers precision
    or the count, whichever the models predict loses less, and fits by the executor's memory model."""
    import dataclasses
    from types import SimpleNamespace

    from swapmoe.core.budget import MemoryModel, Reserve
    from swapmoe.planner_service.search import SearchSettings
    from swapmoe.profiler.report import load_device
    from test_planning_truth import LOWER

    planner = policy(search=SearchSettings(population=16, generations=8), frontier_points=4)
    device = load_device(PROFILES / LM / "devices" / "x86_64-bench", LM)
    layout = dataclasses.replace(device.layout, layers=tuple(dataclasses.replace(l, precisions=LOWER)
                                                             for l in device.layout.layers))
    memory = MemoryModel(layout, Reserve())
    record = SimpleNamespace(node_id="edge-1", budget_bytes=layout.total_bytes, workload="mix",
                             registration=SimpleNamespace(model_fingerprint=LM), memory_model=memory)
    planner._node("edge-1", LM, memory)
    planner._search_later = lambda search, node_id, *args: search(node_id, *args)
    try:
        planner._ready("edge-1", device, replan=False)
        planner._build("edge-1", "mix", 1)
        assert planner.choose(record, "registered").plan.experts_per_layer == (16,) * 6  # everything fits
        record.budget_bytes = layout.total_bytes // 2
        plan = planner.choose(record, "budget change").plan
        assert plan.precision and memory.over_budget(plan.experts_per_layer, record.budget_bytes, plan.precision) == ""
        assert f"precision={plan.precision[0] or 'native'}x" in plan.origin
    finally:
        planner.close()
