"""``--json``: what the status commands print is the servers' own answer in proto3's JSON mapping,
so a script reads the same fields as a gRPC client. Checked against a real executor (a tiny
Mixtral) connected to a real planner behind a real control node."""

import json

import pytest
from google.protobuf import json_format

from polling import wait_until
from serving import own_engine
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.server import serve as serve_executor
from swapmoe.cli import main as cli
from swapmoe.orchestration.fleet import serve as serve_fleet
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, fleet_pb2 as fpb, fleet_pb2_grpc
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc

NODE = "json-node"


@pytest.fixture(scope="module")
def fleet(tiny_model_dir):
    """Addresses of an executor linked to a planner, and of a control node over that planner."""
    with own_engine(tiny_model_dir, NODE) as engine:
        executor = serve_executor(engine)
        planner, _ = serve_planner("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
        addresses = {"executor": f"127.0.0.1:{executor.port}", "planner": f"127.0.0.1:{planner.port}"}
        link = PlannerLink(engine, addresses["planner"], addresses["executor"]).start()
        control = serve_fleet([addresses["planner"]])
        addresses["fleet"] = f"127.0.0.1:{control.port}"
        try:
            wait_until(link.connected.is_set, timeout=30, what="the executor's stream to its planner")
            yield addresses
        finally:
            link.stop()
            for server in (control, planner, executor):
                server.stop(0.5)


def json_of(capsys, *args) -> dict:
    cli.main(list(args))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return json.loads(out.out)


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def acked(fleet) -> ppb.ExecutorStatus:
    with transport.channel(fleet["planner"]) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        status = stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[NODE]), timeout=10).executors[0]
    return status if status.state == ppb.PLAN_STATE_ACKED else None


def test_describe_prints_the_describe_answer(capsys, fleet):
    printed = json_of(capsys, "describe", "--executor", fleet["executor"], "--json")
    with transport.channel(fleet["executor"]) as channel:
        expected = as_dict(executor_pb2_grpc.ExecutorServiceStub(channel).Describe(epb.DescribeRequest(), timeout=10))
    assert printed["memory"].keys() == expected["memory"].keys()  # RSS moves between two calls
    del printed["memory"], expected["memory"]
    assert printed == expected
    assert printed["nodeId"] == NODE and printed["budgetBytes"] == str(1 << 30)  # proto3 JSON: int64 as text


def test_budget_prints_the_set_budget_answer(capsys, fleet):
    printed = json_of(capsys, "budget", "--executor", fleet["executor"], "1Gi", "--reason", "json", "--json")
    assert (printed["previousBudgetBytes"], printed["budgetBytes"]) == (str(1 << 30), str(1 << 30))
    assert printed.keys() >= as_dict(epb.SetBudgetResponse()).keys() | {"memory", "plan"}


def test_planner_status_prints_the_plan_status_answer(capsys, fleet):
    wait_until(lambda: acked(fleet), timeout=30, what="the first plan's ACK")
    printed = json_of(capsys, "planner", "status", "--planner", fleet["planner"], "--json", NODE)
    expected = as_dict(ppb.PlanStatusResponse(executors=[acked(fleet)]))
    [node] = printed["executors"]
    assert node.keys() == expected["executors"][0].keys()
    for field in ("nodeId", "connected", "state", "desiredPlan", "ackedPlan", "budgetBytes", "labels", "pinned"):
        assert node[field] == expected["executors"][0][field], field
    assert printed["summary"]["total"] == 1 and node["state"] == "PLAN_STATE_ACKED"


def test_fleet_nodes_status_and_rollouts_print_the_control_nodes_answers(capsys, fleet):
    wait_until(lambda: acked(fleet), timeout=30, what="the first plan's ACK")
    with transport.channel(fleet["fleet"]) as channel:
        stub = fleet_pb2_grpc.FleetServiceStub(channel)
        printed = json_of(capsys, "fleet", "nodes", "--fleet", fleet["fleet"], "--json")
        listed = stub.ListNodes(fpb.ListNodesRequest(view=ppb.STATUS_VIEW_BRIEF), timeout=10)
        assert [n["status"]["nodeId"] for n in printed["nodes"]] == [NODE]
        assert printed["summary"] == as_dict(listed)["summary"] and printed["unreachablePlanners"] == []

        started = stub.StartRollout(fpb.StartRolloutRequest(budget_bytes=1 << 30, description="json"), timeout=10)
        rollout = wait_until(lambda: (r := stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id),
                                                           timeout=10)).state == fpb.ROLLOUT_STATE_SUCCEEDED and r,
                             timeout=60, what="the rollout to succeed")
        printed = json_of(capsys, "fleet", "status", "--fleet", fleet["fleet"], started.rollout_id, "--nodes", "--json")
        assert printed == as_dict(stub.GetRollout(fpb.GetRolloutRequest(rollout_id=started.rollout_id, page_size=1000),
                                                  timeout=10))
        assert printed["state"] == "ROLLOUT_STATE_SUCCEEDED" and printed["acked"] == rollout.acked == 1
        assert [n["status"]["nodeId"] for n in printed["nodes"]] == [NODE]

        printed = json_of(capsys, "fleet", "rollouts", "--fleet", fleet["fleet"], "--json")
        assert printed == as_dict(stub.ListRollouts(fpb.ListRolloutsRequest(), timeout=10))
        assert [r["rolloutId"] for r in printed["rollouts"]] == [started.rollout_id]
