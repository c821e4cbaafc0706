"""Staged rollouts end to end: a real planner (or two), a real control node, and executors
simulated on the planner's own Connect protocol (``swapmoe.simulation.fleet``): canary and waves,
a halt that rolls back, pause and resume, a control node restarted mid-wave, a budget policy by
label, a fleet sharded over two planners, and ``swapmoe fleet rollout --watch``."""

import time
from contextlib import contextmanager

import grpc
import pytest

from swapmoe.cli import main as cli
from swapmoe.core.errors import InvalidField
from swapmoe.orchestration.fleet import serve as serve_fleet
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve
from swapmoe.rpc import transport
from swapmoe.simulation.fleet import SimSettings, SimulatedFleet
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb, fleet_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until

pytestmark = pytest.mark.slow

IDS = [f"sim-{i:05d}" for i in range(40)]
WAVES = [IDS[:1], IDS[1:4], IDS[4:20], IDS[20:]]  # canary, then 10%, 50%, 100%
FOURS = common_pb2.Plan(experts_per_layer=[4] * 6)


@pytest.fixture
def planner_address():
    server, _ = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    yield f"127.0.0.1:{server.port}"
    server.stop(0.5)


@contextmanager
def simulated(planner: str, count: int = 40, **settings):
    fleet = SimulatedFleet(SimSettings(planner, count=count, telemetry_interval_s=0, **settings)).start()
    try:
        fleet.wait_acked(1, timeout=30)
        yield fleet
    finally:
        fleet.stop()


@contextmanager
def control_node(planners: list[str], state_dir=None):
    server = serve_fleet(planners, state_dir=state_dir)
    channel = transport.channel(f"127.0.0.1:{server.port}")
    stub = fleet_pb2_grpc.FleetServiceStub(channel)
    stub.address = f"127.0.0.1:{server.port}"  # for the command line
    try:
        yield stub
    finally:
        channel.close()
        server.stop(0.5)


def final(stub, rollout_id: str, timeout: float = 30) -> fpb.Rollout:
    return wait_until(lambda: (r := stub.GetRollout(fpb.GetRolloutRequest(rollout_id=rollout_id, summary_only=True),
                                                    timeout=5)).state not in (fpb.ROLLOUT_STATE_IN_PROGRESS,
                                                                              fpb.ROLLOUT_STATE_ROLLING_BACK) and r,
                      timeout, "the rollout's end")


def statuses(planner: str, node_ids: list[str]) -> dict[str, ppb.ExecutorStatus]:
    with transport.channel(planner) as channel:
        answer = planner_pb2_grpc.PlannerServiceStub(channel).GetPlanStatus(
            ppb.PlanStatusRequest(node_ids=node_ids, view=ppb.STATUS_VIEW_BRIEF), timeout=5)
    return {s.node_id: s for s in answer.executors}


def rollout_nodes(stub, rollout_id: str) -> list[fpb.FleetNode]:
    nodes, token = [], ""
    while True:
        page = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=rollout_id, page_size=15, page_token=token), timeout=5)
        nodes += page.nodes
        if not (token := page.next_page_token):
            return nodes


def test_a_staged_rollout_sends_the_canary_first_then_each_wave_after_the_last_acked(planner_address):
    with simulated(planner_address) as sim, control_node([planner_address]) as stub:
        started = stub.StartRollout(fpb.StartRolloutRequest(plan=FOURS, bake_ms=100), timeout=10)
        assert (started.targeted, started.waves, started.waiting) == (40, 4, 40)
        done = final(stub, started.rollout_id)
        assert done.state == fpb.ROLLOUT_STATE_SUCCEEDED and done.acked == 40 and done.message == ""
        received = {n: sim.record(n).plans[-1][1] for n in IDS}
        for wave, after in zip(WAVES, WAVES[1:]):
            assert max(received[n] for n in wave) < min(received[n] for n in after)
        nodes = rollout_nodes(stub, started.rollout_id)
        assert [n.status.node_id for n in nodes] == IDS
        assert [n.wave for n in nodes] == [w for w, ids in enumerate(WAVES) for _ in ids]
        assert {n.rollout_state for n in nodes} == {fpb.ROLLOUT_NODE_STATE_ACKED}
        assert all(s.pinned and list(s.acked_plan.experts_per_layer) == [4] * 6
                   for s in statuses(planner_address, IDS).values())


def test_nacks_past_the_allowed_share_halt_the_rollout_and_the_acked_nodes_get_their_previous_plans(planner_address):
    with simulated(planner_address) as sim, control_node([planner_address]) as stub:
        even = list(sim.settings.memory_model.fit(sim.settings.budget_bytes))
        with transport.channel(planner_address) as channel:  # two nodes run an operator's pinned plan before
            planner_pb2_grpc.PlannerServiceStub(channel).PushPlan(ppb.PushPlanRequest(
                node_ids=IDS[1:3], plan=common_pb2.Plan(experts_per_layer=[3] * 6)), timeout=5)
        sim.wait_acked(2, node_ids=IDS[1:3])
        sim.set_nack({IDS[5], IDS[6]})  # wave 2
        started = stub.StartRollout(fpb.StartRolloutRequest(plan=FOURS), timeout=10)
        done = final(stub, started.rollout_id)
        assert done.state == fpb.ROLLOUT_STATE_FAILED
        assert done.message.startswith("halted at wave 2: 2 of 20 nodes failed (10% > 5%): sim-00005 NACKed: ")
        assert (done.rolled_back, done.nacked, done.waiting) == (18, 2, 20)
        assert all(len(sim.record(n).plans) == 1 for n in WAVES[3])  # the last wave never saw the plan

        def restored():
            found = statuses(planner_address, IDS[:20])
            return all(s.state == ppb.PLAN_STATE_ACKED and s.acked_plan.version == s.desired_plan.version
                       for n, s in found.items() if n not in (IDS[5], IDS[6])) and found

        found = wait_until(restored, 10, "the rollback's ACKs")
        for node_id, status in found.items():
            if node_id in IDS[1:3]:
                assert status.pinned and list(status.acked_plan.experts_per_layer) == [3] * 6
            elif node_id not in (IDS[5], IDS[6]):
                assert not status.pinned and list(status.acked_plan.experts_per_layer) == even


def test_a_paused_rollout_sends_no_further_wave_until_it_is_resumed(planner_address):
    with simulated(planner_address), control_node([planner_address]) as stub:
        started = stub.StartRollout(fpb.StartRolloutRequest(plan=FOURS, bake_ms=300), timeout=10)
        paused = stub.PauseRollout(fpb.RolloutActionRequest(rollout_id=started.rollout_id, reason="look first"))
        assert paused.state == fpb.ROLLOUT_STATE_PAUSED and paused.message == "paused: look first"
        time.sleep(1.0)  # the canary, if it was sent, has answered by now; nothing more goes out
        before = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id, summary_only=True))
        time.sleep(0.5)
        after = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id, summary_only=True))
        assert after.state == fpb.ROLLOUT_STATE_PAUSED and after.waiting >= 39 and after.acked == before.acked
        stub.ResumeRollout(fpb.RolloutActionRequest(rollout_id=started.rollout_id))
        done = final(stub, started.rollout_id)
        assert done.state == fpb.ROLLOUT_STATE_SUCCEEDED and done.acked == 40
        with pytest.raises(grpc.RpcError) as error:
            stub.PauseRollout(fpb.RolloutActionRequest(rollout_id=started.rollout_id))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "SUCCEEDED" in error.value.details()


def test_an_abort_with_rollback_ends_the_rollout_and_gives_the_nodes_reached_their_previous_plans(planner_address):
    with simulated(planner_address), control_node([planner_address]) as stub:
        started = stub.StartRollout(fpb.StartRolloutRequest(plan=FOURS, bake_ms=60_000), timeout=10)
        wait_until(lambda: stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id,
                                                                 summary_only=True)).wave == 1, 10, "the canary")
        stub.AbortRollout(fpb.RolloutActionRequest(rollout_id=started.rollout_id, rollback=True, reason="wrong plan"))
        done = final(stub, started.rollout_id)
        assert (done.state, done.message, done.rolled_back, done.waiting) == (
            fpb.ROLLOUT_STATE_ABORTED, "aborted: wrong plan", 1, 39)
        canary = wait_until(lambda: (s := statuses(planner_address, IDS[:1])[IDS[0]]).acked_plan.version == 3 and s, 10,
                            "the canary's previous plan")
        assert not canary.pinned and list(canary.acked_plan.experts_per_layer) != [4] * 6


def test_a_control_node_restarted_mid_wave_resumes_the_rollout_from_its_state_directory(planner_address, tmp_path):
    with simulated(planner_address, ack_delay_s=1.5) as sim:
        request = fpb.StartRolloutRequest(plan=FOURS, canary_nodes=0, wave_percents=[100])
        with control_node([planner_address], tmp_path) as stub:
            started = stub.StartRollout(request, timeout=10)
            wait_until(lambda: stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id,
                                                                     summary_only=True)).pending == 40,
                       10, "the wave's push")
        assert (tmp_path / "rollouts" / f"{started.rollout_id}.json").is_file()
        with control_node([planner_address], tmp_path) as stub:
            done = final(stub, started.rollout_id)
            assert done.state == fpb.ROLLOUT_STATE_SUCCEEDED and done.acked == 40
            assert all(len(sim.record(n).plans) == 2 for n in IDS)  # the wave was re-polled, not pushed again
            assert [r.rollout_id for r in stub.ListRollouts(fpb.ListRolloutsRequest()).rollouts] == ["rollout-1"]
            assert stub.StartRollout(request, timeout=10).rollout_id == "rollout-2"


def test_a_planner_restarted_between_waves_is_pushed_again_and_the_rollout_succeeds(tmp_path):
    """The next wave's push finds the planner down, then its executors away while they reconnect:
    neither is a failure before the wave's time is up."""
    server, _ = serve("127.0.0.1:0", state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    address = f"127.0.0.1:{server.port}"
    try:
        with simulated(address) as sim, control_node([address]) as stub:
            request = fpb.StartRolloutRequest(plan=FOURS, canary_nodes=0, wave_percents=[50, 100], bake_ms=1500,
                                              timeout_ms=60_000)
            started = stub.StartRollout(request, timeout=10)
            wait_until(lambda: stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id, summary_only=True),
                                               timeout=5).acked == 20, 30, "the first wave acked")
            server.stop(0)  # during the bake: the second wave's push finds no planner
            time.sleep(2.0)
            server, _ = serve(address, state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
            done = final(stub, started.rollout_id, timeout=60)
            assert done.state == fpb.ROLLOUT_STATE_SUCCEEDED and done.acked == 40, done.message
            assert all(tuple(node.plan.experts_per_layer) == (4,) * 6 for node in sim.nodes)
    finally:
        server.stop(0)


def test_a_budget_policy_by_label_reaches_only_the_class_it_selects(planner_address):
    with simulated(planner_address) as sim, control_node([planner_address]) as stub:
        before = sim.settings.budget_bytes
        budget = sim.settings.memory_model.plan_bytes([4] * 6)
        started = stub.StartRollout(fpb.StartRolloutRequest(selector="class=a", budget_bytes=budget), timeout=10)
        assert started.targeted == 20
        assert final(stub, started.rollout_id).state == fpb.ROLLOUT_STATE_SUCCEEDED
        assert [node.budget for node in sim.nodes] == [budget if i % 2 == 0 else before for i in range(40)]


def test_one_rollout_reaches_a_fleet_sharded_over_two_planners_and_listing_pages_across_them():
    planners = [serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))[0] for _ in range(2)]
    addresses = [f"127.0.0.1:{p.port}" for p in planners]
    try:
        with simulated(addresses[0], count=20, prefix="a-") as a, simulated(addresses[1], count=20, prefix="b-") as b, \
                control_node(addresses) as stub:
            pages, token = [], ""
            while True:
                page = stub.ListNodes(fpb.ListNodesRequest(page_size=15, page_token=token), timeout=5)
                pages.append(page)
                if not (token := page.next_page_token):
                    break
            assert [len(p.nodes) for p in pages] == [15, 5, 15, 5]  # a page ends where a shard does
            assert all(p.summary.total == 40 and p.summary.connected == 40 for p in pages)
            listed = [(n.planner, n.status.node_id) for p in pages for n in p.nodes]
            assert listed == [(addresses[0], n) for n in a.node_ids()] + [(addresses[1], n) for n in b.node_ids()]
            started = stub.StartRollout(fpb.StartRolloutRequest(plan=FOURS, wave_percents=[50, 100]), timeout=10)
            assert final(stub, started.rollout_id).acked == 40
            assert all(r.acked_version >= 2 for r in a.records() + b.records())
            planners[1].stop(0)
            answer = stub.ListNodes(fpb.ListNodesRequest(), timeout=15)
            assert answer.unreachable_planners == [addresses[1]] and answer.summary.total == 20
    finally:
        for p in planners:
            p.stop(0)


def test_the_rollout_command_watches_progress_and_exits_zero_on_success(planner_address, capsys):
    with simulated(planner_address, count=8), control_node([planner_address]) as stub:
        address = stub.address
        with pytest.raises(SystemExit) as ended:
            cli.main(["fleet", "rollout", "--fleet", address, "--experts", "4,4,4,4,4,4", "--waves", "50,100",
                      "--watch"])
        assert ended.value.code == 0
        out = capsys.readouterr().out
        assert "rollout-1 SUCCEEDED wave 3/3: 8 acked, 0 pending, 0 nacked, 0 unreachable, 0 waiting of 8" in out
        cli.main(["fleet", "nodes", "--fleet", address, "--selector", "class=b"])
        out = capsys.readouterr().out
        assert "4 executors: 4 connected, 4 acked" in out and "sim-00001" in out and "sim-00000" not in out
        cli.main(["fleet", "status", "--fleet", address, "rollout-1", "--nodes"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].split() == ["NODE", "PLANNER", "WAVE", "STATE", "ACKED", "LAST", "ANSWER"]
        assert len(lines) == 10 and lines[2].split()[:4] == ["sim-00000", planner_address, "0", "ACKED"]
        cli.main(["fleet", "rollouts", "--fleet", address])
        assert capsys.readouterr().out.splitlines()[1].split()[:5] == ["rollout-1", "SUCCEEDED", "3/3", "8", "8"]
        for command in (["pause", "rollout-1"], ["rollout", "--nodes", "nope"]):
            with pytest.raises(SystemExit) as ended:
                cli.main(["fleet", *command, "--fleet", address])
            assert ended.value.code == 2
        err = capsys.readouterr().err
        assert "INVALID_ARGUMENT: rollout_id: rollout-1 is SUCCEEDED" in err and "NOT_FOUND" in err and "nope" in err


def test_a_rollout_may_name_the_plans_rows_and_rows_past_any_executors_are_refused_by_name(capsys):
    from swapmoe.cli.fleet_commands import rollout_request
    from swapmoe.orchestration.rollouts import check_plan

    args = cli.build_parser().parse_args(["fleet", "rollout", "--experts", "4,4", "--rows", "2"])
    request = rollout_request(args)
    assert request.plan.rows == 2 and list(request.plan.experts_per_layer) == [4, 4]
    check_plan(request.plan)
    request.plan.rows = 5000
    with pytest.raises(InvalidField, match=r"^plan\.rows: 5000 is outside the allowed range 0 to 4096"):
        check_plan(request.plan)
    with pytest.raises(SystemExit) as ended:
        cli.main(["fleet", "rollout", "--fleet", "127.0.0.1:1", "--rows", "2"])
    assert ended.value.code == 2 and "--rows is part of a plan: give --experts with it" in capsys.readouterr().err
