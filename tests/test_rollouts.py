"""Staged rollouts as a specification: waves, when a rollout halts, what a rollback sends, which
requests are refused, and rollouts kept on disk (``orchestration/rollouts.py`` and
``rollout_store.py``: pure policy and a file per rollout, no planner, no thread)."""

import json

import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.orchestration import rollouts as ro
from swapmoe.orchestration.rollout_store import RolloutStore, from_json, to_json
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb, planner_pb2 as ppb

IDS = [f"edge-{i:02d}" for i in range(40)]


def status(node_id, pinned=False, budget=1 << 30, experts=(4, 4), connected=True):
    s = ppb.ExecutorStatus(node_id=node_id, connected=connected, budget_bytes=budget, pinned=pinned,
                           state=ppb.PLAN_STATE_ACKED)
    s.desired_plan.CopyFrom(common_pb2.Plan(version=3, experts_per_layer=experts, origin="op", budget_bytes=5))
    s.acked_plan.CopyFrom(s.desired_plan)
    return s


def rollout(ids=IDS, request=None, planner=lambda n: "p1", **status_args):
    request = request or fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[2, 2]))
    located = {n: (planner(n), status(n, **status_args)) for n in ids}
    return ro.new_rollout("rollout-1", request, ro.check_request(request), located, now_ns=1)


def answer(r, node_id, state, reason=""):
    """The node's status after the rollout's plan (sent as version 10) reached it."""
    target = r.targets[node_id]
    target.version = target.version or 10
    s = ppb.ExecutorStatus(node_id=node_id, connected=state != "away")
    if state == "ack":
        s.acked_plan.version = target.version
    elif state == "nack":
        s.state, s.last_result.plan_version, s.last_result.reason = ppb.PLAN_STATE_NACKED, target.version, reason
    target.state = ro.PENDING if target.state == ro.WAITING else target.state
    ro.observe(target, s)


def answer_wave(r, nack=(), away=()):
    for t in r.wave_targets():
        answer(r, t.node_id, "nack" if t.node_id in nack else "away" if t.node_id in away else "ack", "too big")


# -- waves ------------------------------------------------------------------------------------

def test_the_canary_goes_alone_then_waves_reach_their_cumulative_percentages_in_node_id_order():
    waves = ro.waves(reversed(IDS), 1, (10, 50, 100))
    assert waves == [IDS[:1], IDS[1:4], IDS[4:20], IDS[20:]]
    assert ro.waves(IDS, 0, (100,)) == [IDS]


def test_percentages_round_up_empty_waves_are_left_out_and_a_big_canary_takes_all():
    assert ro.waves(["a", "b", "c"], 1, (10, 50, 100)) == [["a"], ["b"], ["c"]]
    assert ro.waves(["a", "b"], 5, (10, 100)) == [["a", "b"]]
    assert ro.waves([], 1, (100,)) == []


def test_every_target_is_in_exactly_one_wave():
    r = rollout()
    assert sorted(n for wave in r.by_wave for n in wave) == IDS and len(r.by_wave) == 4
    assert [t.wave for t in r.wave_targets(1)] == [1, 1, 1]


# -- node states ------------------------------------------------------------------------------

def test_a_node_acks_when_its_acked_version_reaches_the_one_sent_and_nacks_only_that_version_or_newer():
    s = ppb.ExecutorStatus(connected=True)
    s.acked_plan.version = 7
    assert ro.node_state(s, 7) == ro.ACKED and ro.node_state(s, 8) == ro.PENDING
    s.state, s.last_result.plan_version = ppb.PLAN_STATE_NACKED, 6
    assert ro.node_state(s, 8) == ro.PENDING  # a NACK of an older plan says nothing of ours
    s.last_result.plan_version = 8
    assert ro.node_state(s, 8) == ro.NACKED
    assert ro.node_state(ppb.ExecutorStatus(connected=False), 8) == ro.UNREACHABLE


def test_an_away_node_that_returns_within_the_wave_counts_as_acked_and_silent_ones_expire():
    r = rollout()
    r.wave = 1
    answer(r, IDS[1], "away")
    assert r.targets[IDS[1]].state == ro.UNREACHABLE and r.targets[IDS[1]].reason == "not connected"
    answer(r, IDS[1], "ack")
    assert r.targets[IDS[1]].state == ro.ACKED
    r.targets[IDS[2]].state = ro.PENDING
    ro.expire(r.wave_targets(), 30_000)
    assert r.targets[IDS[2]].state == ro.UNREACHABLE and "no answer within 30 s" in r.targets[IDS[2]].reason


# -- decisions --------------------------------------------------------------------------------

def test_a_clean_rollout_waits_for_each_wave_then_succeeds_after_the_last():
    r = rollout()
    r.targets[IDS[0]].state = ro.PENDING
    assert ro.decide(r, timed_out=False) is ro.Decision.WAIT
    for wave in range(4):
        r.wave = wave
        answer_wave(r)
        assert ro.decide(r, False) is (ro.Decision.SUCCEEDED if wave == 3 else ro.Decision.WAVE_DONE)


def test_any_failure_in_the_canary_halts_once_an_away_node_had_the_wave_to_return():
    r = rollout()
    answer_wave(r, away=[IDS[0]])
    assert ro.decide(r, False) is ro.Decision.WAIT  # its planner may be restarting: it may come back
    assert ro.decide(r, True) is ro.Decision.HALT
    assert ro.failure_message(r, True).startswith("halted at the canary (wave 0): 1 of 1 nodes failed "
                                                  "(any failure halts the canary): edge-00 unreachable: not connected")


def test_a_wave_halts_once_more_than_the_allowed_share_of_the_nodes_sent_failed():
    def through_wave_2(nack):  # 5% of the 20 nodes sent by wave 2 is 1 node
        r = rollout()
        for wave in range(3):
            r.wave = wave
            answer_wave(r, nack=nack)
        return r

    assert ro.decide(through_wave_2([IDS[5]]), False) is ro.Decision.WAVE_DONE  # 1 of 20 is 5%: not more
    r = through_wave_2([IDS[5], IDS[6]])
    assert ro.decide(r, False) is ro.Decision.HALT
    assert ro.failure_message(r, True) == ("halted at wave 2: 2 of 20 nodes failed (10% > 5%): edge-05 NACKed: "
                                           "too big; edge-06 NACKed: too big")


def test_nacks_halt_before_the_wave_is_over_but_away_nodes_only_count_at_its_end():
    r = rollout(request=fpb.StartRolloutRequest(canary_nodes=0, wave_percents=[50, 100], max_failure_share=0.1))
    for node_id in IDS[:3]:
        answer(r, node_id, "away")
    r.targets[IDS[3]].state = ro.PENDING
    assert ro.decide(r, False) is ro.Decision.WAIT  # 3 of 20 away, but they may come back
    assert ro.decide(r, True) is ro.Decision.HALT
    r = rollout(request=fpb.StartRolloutRequest(canary_nodes=0, wave_percents=[50, 100], max_failure_share=0.1))
    for node_id in IDS[:3]:
        answer(r, node_id, "nack")
    r.targets[IDS[3]].state = ro.PENDING
    assert ro.decide(r, False) is ro.Decision.HALT


def test_a_message_names_five_failures_and_counts_the_rest():
    r = rollout(request=fpb.StartRolloutRequest(canary_nodes=0, wave_percents=[100], max_failure_share=0.0))
    answer_wave(r, nack=IDS[:8])
    assert ro.failure_message(r, True).endswith("edge-04 NACKed: too big; and 3 more")


# -- rollback ---------------------------------------------------------------------------------

def test_a_rollback_repins_pinned_plans_and_unpins_the_rest_one_push_per_planner_and_previous_plan():
    located = {n: ("p1" if i % 2 else "p2", status(n, pinned=i < 4, experts=(3, 3) if i < 2 else (4, 4)))
               for i, n in enumerate(IDS[:8])}
    request = fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[2, 2]), canary_nodes=0,
                                      wave_percents=[100])
    r = ro.new_rollout("rollout-1", request, ro.check_request(request), located, 1)
    answer_wave(r, nack=[IDS[7]])
    pushes = ro.rollback_pushes(r)
    shown = [(p, list(push.node_ids), list(push.plan.experts_per_layer) if push.HasField("plan") else None)
             for p, push in pushes]
    assert shown == [("p1", ["edge-01"], [3, 3]), ("p1", ["edge-03"], [4, 4]),
                     ("p1", ["edge-05", "edge-07"], None),  # NACKed nodes too: their planner holds our plan
                     ("p2", ["edge-00"], [3, 3]), ("p2", ["edge-02"], [4, 4]), ("p2", ["edge-04", "edge-06"], None)]
    assert all(push.budget_bytes == 0 and push.plan.version == 0 and push.plan.budget_bytes == 0
               and push.view == ppb.STATUS_VIEW_BRIEF for _, push in pushes)
    for _, push in pushes:
        ro.rolled_back(r, list(push.node_ids))
    assert r.counts()[ro.ROLLED_BACK] == 7 and r.targets[IDS[7]].state == ro.NACKED
    assert [list(p.node_ids) for _, p in ro.rollback_pushes(r)] == [["edge-07"]]


def test_a_budget_rollout_gives_each_node_its_previous_budget_back_and_skips_nodes_never_sent():
    request = fpb.StartRolloutRequest(budget_bytes=1 << 29, canary_nodes=0, wave_percents=[50, 100])
    located = {n: ("p1", status(n, budget=(1 << 30) + i % 2)) for i, n in enumerate(IDS[:4])}
    r = ro.new_rollout("rollout-1", request, ro.check_request(request), located, 1)
    answer_wave(r)
    pushes = ro.rollback_pushes(r)
    assert [(list(p.node_ids), p.budget_bytes, p.HasField("plan")) for _, p in pushes] == [
        (["edge-00"], 1 << 30, False), (["edge-01"], (1 << 30) + 1, False)]


def test_a_push_the_planner_refused_is_not_rolled_back_but_one_that_failed_on_the_way_is():
    r = rollout(request=fpb.StartRolloutRequest(canary_nodes=0, wave_percents=[100]), ids=IDS[:2])
    r.targets[IDS[0]].state = ro.NACKED  # refused: version never set
    r.targets[IDS[1]].state = ro.UNREACHABLE  # the push's answer was lost
    assert [list(p.node_ids) for _, p in ro.rollback_pushes(r)] == [[IDS[1]]]


# -- operator actions -------------------------------------------------------------------------

def test_pause_resume_and_abort_follow_the_state_machine():
    r = rollout()
    ro.pause(r, "lunch")
    assert r.state == ro.PAUSED and r.message == "paused: lunch"
    with pytest.raises(InvalidField, match="rollout-1 is PAUSED: only a rollout in progress pauses"):
        ro.pause(r, "")
    ro.resume(r)
    assert r.state == ro.IN_PROGRESS and r.message == ""
    ro.abort(r, rollback=True, reason="")
    assert r.state == ro.ROLLING_BACK and r.ends_as == ro.ABORTED and r.message == "aborted by an operator"
    with pytest.raises(InvalidField, match="only a paused rollout resumes"):
        ro.resume(r)


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("request_, field", [
    (fpb.StartRolloutRequest(wave_percents=[50, 40, 100]), "wave_percents[1]"),
    (fpb.StartRolloutRequest(wave_percents=[10, 50]), "wave_percents[1]"),
    (fpb.StartRolloutRequest(wave_percents=[0, 100]), "wave_percents[0]"),
    (fpb.StartRolloutRequest(max_failure_share=1.5), "max_failure_share"),
    (fpb.StartRolloutRequest(max_failure_share=float("nan")), "max_failure_share"),
    (fpb.StartRolloutRequest(canary_nodes=1_000_000), "canary_nodes"),
    (fpb.StartRolloutRequest(timeout_ms=4_000_000_000), "timeout_ms"),
    (fpb.StartRolloutRequest(bake_ms=4_000_000_000), "bake_ms"),
    (fpb.StartRolloutRequest(node_ids=["a", "a"]), "node_ids[1]"),
    (fpb.StartRolloutRequest(node_ids=[""]), "node_ids[0]"),
    (fpb.StartRolloutRequest(node_ids=["a"], selector="class=x"), "selector"),
    (fpb.StartRolloutRequest(selector="class"), "selector"),
    (fpb.StartRolloutRequest(plan=common_pb2.Plan()), "plan.experts_per_layer"),
    (fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[2, 0])), "plan.experts_per_layer[1]"),
    (fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[2], strategy=9)), "plan.strategy"),
    (fpb.StartRolloutRequest(budget_bytes=1 << 60), "budget_bytes"),
])
def test_a_bad_request_is_refused_naming_its_field(request_, field):
    with pytest.raises(InvalidField) as error:
        ro.check_request(request_)
    assert error.value.field == field


def test_defaults_fill_what_a_request_leaves_out_and_an_explicit_zero_canary_is_kept():
    assert ro.check_request(fpb.StartRolloutRequest()) == ro.Settings(1, (10, 50, 100), 0.05, 30_000, 0)
    assert ro.check_request(fpb.StartRolloutRequest(canary_nodes=0, max_failure_share=0)).canary_nodes == 0


def test_a_plan_for_another_number_of_layers_is_refused_before_any_wave():
    with pytest.raises(InvalidField, match="has 3 entries but edge-00's model has 2 MoE layers"):
        ro.check_plan_fits(common_pb2.Plan(experts_per_layer=[1, 1, 1]), [status("edge-00")])
    ro.check_plan_fits(common_pb2.Plan(experts_per_layer=[1]), [ppb.ExecutorStatus(node_id="new")])  # never planned


# -- the store --------------------------------------------------------------------------------

def test_a_rollout_survives_a_round_trip_through_its_file(tmp_path):
    r = rollout(planner=lambda n: "p1" if n < "edge-20" else "p2", pinned=True)
    answer_wave(r, nack=[IDS[0]])
    r.wave, r.message, r.next_wave_ns, r.wave_started_ns = 1, "m", 5, 6
    store = RolloutStore(tmp_path)
    store.save(r.rollout_id, lambda: to_json(r))
    [back] = RolloutStore(tmp_path).load()
    assert to_json(back) == to_json(r) and back.by_wave == r.by_wave and back.settings == r.settings
    assert back.targets[IDS[0]] == r.targets[IDS[0]] and back.targets[IDS[0]].previous.plan is not None
    raw = json.loads((tmp_path / "rollouts" / "rollout-1.json").read_text())
    assert len(raw["previous_plans"]) == 1 and raw["planners"] == ["p1", "p2"]  # tables, not copies per node


def test_a_corrupt_rollout_file_is_set_aside_and_the_others_load(tmp_path, caplog):
    store = RolloutStore(tmp_path)
    good = rollout()
    store.save("rollout-1", lambda: to_json(good))
    bad = to_json(good) | {"rollout_id": "rollout-2"}
    bad["targets"][0][4] = 99  # no such node state
    (tmp_path / "rollouts" / "rollout-2.json").write_text(json.dumps(bad))
    (tmp_path / "rollouts" / "rollout-3.json").write_text("{not json")
    assert [r.rollout_id for r in store.load()] == ["rollout-1"]
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["rollout-1.json", "rollout-2.bad",
                                                                         "rollout-3.bad"]
    assert "setting it aside" in caplog.text


def test_writes_under_way_are_throttled_and_a_flush_writes_what_was_held_back(tmp_path):
    store = RolloutStore(tmp_path, interval_s=60)
    writes = []

    def snapshot():
        writes.append(1)
        return to_json(rollout())

    store.save("rollout-1", snapshot)
    store.save("rollout-1", snapshot, urgent=False)
    assert len(writes) == 1
    store.flush("rollout-1", snapshot)
    store.flush("rollout-1", snapshot)  # nothing held back any more
    assert len(writes) == 2


def test_from_json_refuses_a_file_whose_waves_have_a_gap():
    raw = to_json(rollout(ids=IDS[:3]))
    raw["targets"][1][2] = 5
    with pytest.raises(ValueError):
        from_json(raw)
