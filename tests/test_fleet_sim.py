"""The simulated fleet (simulation/fleet.py) against a real planner: it speaks the
executor's protocol well enough that the planner plans for it, hears its ACKs and NACKs,
its telemetry and its re-registrations, and is never left waiting on a profile."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve
from swapmoe.rpc import transport
from swapmoe.simulation.fleet import SimSettings, SimulatedFleet, every_share, parse_status
from swapmoe.v1 import common_pb2, executor_pb2 as epb, planner_pb2 as ppb, planner_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

NACKERS = {"sim-00007", "sim-00031"}


@pytest.fixture
def planner_server():
    server, registry = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    yield server
    server.stop(0.5)


def statuses(port: int, node_ids: list[str]) -> dict[str, ppb.ExecutorStatus]:
    with transport.channel(f"127.0.0.1:{port}") as channel:
        answer = planner_pb2_grpc.PlannerServiceStub(channel).GetPlanStatus(ppb.PlanStatusRequest(node_ids=node_ids))
    return {status.node_id: status for status in answer.executors}


def wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_fifty_simulated_executors_register_get_the_even_split_and_answer_it(planner_server):
    settings = SimSettings(f"127.0.0.1:{planner_server.port}", count=50, nack=NACKERS, telemetry_interval_s=0.2)
    with SimulatedFleet(settings) as fleet:
        fleet.wait_connected(50, timeout=10)
        stats = fleet.wait_acked(1, timeout=10)
        assert stats["acked"] == 48 and stats["nacked"] == 2 and stats["errors"] == {}
        ids = fleet.node_ids()
        assert ids[0] == "sim-00000" and ids[-1] == "sim-00049"

        even = settings.memory_model.fit(settings.budget_bytes)  # no profile for this model: the even split

        def reported():  # every node's memory and throughput telemetry has arrived
            found = statuses(planner_server.port, ids)
            return found if all(s.HasField("throughput") for s in found.values()) else None

        found = wait_for(reported)
        assert len(found) == 50 and all(s.connected for s in found.values())
        for i, (node_id, status) in enumerate(sorted(found.items())):
            assert dict(status.labels) == {"class": "ab"[i % 2], "region": ["eu", "us"][i // 2 % 2]}
            assert tuple(status.desired_plan.experts_per_layer) == even
            assert status.memory.budget_bytes == settings.budget_bytes
            assert status.memory.accounted_bytes <= settings.budget_bytes
            if node_id in NACKERS:
                assert status.state == ppb.PLAN_STATE_NACKED and "reject" in status.last_result.reason
            else:
                assert status.state == ppb.PLAN_STATE_ACKED
                assert status.acked_plan.version == fleet.record(node_id).acked_version


def test_a_plan_carrying_a_budget_sets_it_and_a_restarted_planner_sees_the_fleet_resume():
    server, _ = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    port = server.port
    settings = SimSettings(f"127.0.0.1:{port}", count=10, telemetry_interval_s=0)
    try:
        with SimulatedFleet(settings) as fleet:
            fleet.wait_acked(1, timeout=10)
            budget = settings.memory_model.plan_bytes([4] * 6)
            plan = common_pb2.Plan(experts_per_layer=[4] * 6, update_frequency=8)
            with transport.channel(f"127.0.0.1:{port}") as channel:
                planner_pb2_grpc.PlannerServiceStub(channel).PushPlan(ppb.PushPlanRequest(plan=plan,
                                                                                          budget_bytes=budget))
            fleet.wait_acked(2, timeout=10)
            assert all(node.budget == budget for node in fleet.nodes)
            assert fleet.stats()["budget_changes"] == 10

            server.stop(0)  # the streams end; each node registers again, with its secret and acked plan
            server, _ = serve(f"127.0.0.1:{port}", settings=PlannerSettings(profile_devices=False))
            fleet.wait_acked(lambda record: record.streams == 2 and record.connected, timeout=15)
            found = statuses(port, fleet.node_ids())
            assert len(found) == 10 and all(s.connected and s.acked_plan.version == 2 and s.budget_bytes == budget for s in found.values())
            assert fleet.stats()["reconnects"] == 10
    finally:
        server.stop(0.5)


def test_a_profile_asked_of_a_simulated_executor_fails_at_once(planner_server):
    with SimulatedFleet(SimSettings(f"127.0.0.1:{planner_server.port}", count=2, telemetry_interval_s=0)) as fleet:
        fleet.wait_connected(2, timeout=10)
        with transport.channel(f"127.0.0.1:{planner_server.port}") as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ProfileExecutor(ppb.ProfileExecutorRequest(node_id="sim-00001", request=epb.ProfileRequest()),
                                     timeout=5)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no device to profile" in raised.value.details()


def test_the_command_line_fleet_reports_its_status_and_stops_on_sigterm(planner_server):
    ids = [f"sim-{i:05d}" for i in range(20)]
    assert every_share(ids, 0.25) == {"sim-00003", "sim-00007", "sim-00011", "sim-00015", "sim-00019"}
    process = subprocess.Popen(
        [sys.executable, "-m", "swapmoe.simulation.fleet", "--planner", f"127.0.0.1:{planner_server.port}", "--count", "20",
         "--nack-share", "0.25", "--telemetry-interval", "0.5", "--status-every", "0.3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert process.stdout.readline().startswith("fleet-sim started")
        deadline, status = time.monotonic() + 15, {}
        while not (status.get("acked") == 15 and status.get("nacked") == 5):
            assert time.monotonic() < deadline, f"no status line with every plan answered; last: {status}"
            status = parse_status(process.stdout.readline())
        assert status["connected"] == 20 and status["errors"] == 0
        found = statuses(planner_server.port, ids)
        assert {n for n, s in found.items() if s.state == ppb.PLAN_STATE_NACKED} == every_share(ids, 0.25)
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=10)[0].splitlines()
        assert process.returncode == 0 and rest[-1].startswith("fleet-sim stopped")
    finally:
        process.kill()
