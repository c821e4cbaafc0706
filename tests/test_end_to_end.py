"""The walking skeleton: planner, executor and control node as separate processes on loopback."""

import re
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.orchestration.processes import spawn, swapmoe_command
from swapmoe.rpc import transport
from swapmoe.v1 import (common_pb2, executor_pb2 as epb, executor_pb2_grpc, fleet_pb2 as fpb, fleet_pb2_grpc,
                        planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb)

from polling import wait_until

pytestmark = pytest.mark.slow

NODE = "edge-1"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    services = {}
    try:
        services["planner"] = spawn("planner", ["planner", "serve", "--port", "0"], log_dir=logs)
        services["executor"] = spawn("executor", [
            "executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB", "--port", "0",
            "--planner", services["planner"].address, "--node-id", NODE], log_dir=logs)
        services["fleet"] = spawn("fleet", ["fleet", "serve", "--port", "0", "--planner",
                                            services["planner"].address], log_dir=logs)
        yield services
    finally:
        for service in reversed(list(services.values())):
            service.stop()


def executor_stub(cluster):
    return executor_pb2_grpc.ExecutorServiceStub(transport.channel(cluster["executor"].address))


def planner_stub(cluster):
    return planner_pb2_grpc.PlannerServiceStub(transport.channel(cluster["planner"].address))


def fleet_stub(cluster):
    return fleet_pb2_grpc.FleetServiceStub(transport.channel(cluster["fleet"].address))


def node_status(cluster):
    """The planner's view of the executor; None while the planner does not know it (yet)."""
    try:
        return planner_stub(cluster).GetPlanStatus(ppb.PlanStatusRequest(node_ids=[NODE]), timeout=5).executors[0]
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None


def collect(stream, into: list) -> threading.Thread:
    """Read a server stream into a list on a thread, until it is cancelled."""

    def read():
        try:
            into.extend(stream)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.CANCELLED, error

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_the_executor_registers_and_acks_the_planners_first_plan(cluster):
    status = wait_until(lambda: (s := node_status(cluster)) and s.state == ppb.PLAN_STATE_ACKED and s,
                        what="the first plan's ACK")
    assert status.connected and status.layout.architecture == "mixtral"
    assert status.acked_plan.version >= 1 and status.last_result.accepted
    described = executor_stub(cluster).Describe(epb.DescribeRequest(), timeout=5)
    assert described.plan.version == status.acked_plan.version


def test_a_client_streams_a_generation(cluster):
    chunks = list(executor_stub(cluster).Generate(epb.GenerateRequest(text="import sys", max_new_tokens=8), timeout=60))
    assert len([t for c in chunks for t in c.token_ids]) == chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].finish_reason != epb.FINISH_REASON_UNSPECIFIED


def test_a_fleet_rollout_is_acked_and_telemetry_reports_it(cluster):
    wait_until(lambda: node_status(cluster).state == ppb.PLAN_STATE_ACKED, what="the first plan")
    events = []
    stream = executor_stub(cluster).Subscribe(epb.SubscribeRequest(interval_ms=100, topics=[tpb.TOPIC_EVENTS]))
    collect(stream, events)
    rollout = fleet_stub(cluster).StartRollout(fpb.StartRolloutRequest(
        node_ids=[NODE], plan=common_pb2.Plan(experts_per_layer=[2, 3])), timeout=10)
    final = wait_until(lambda: (r := fleet_stub(cluster).GetRollout(
        fpb.GetRolloutRequest(rollout_id=rollout.rollout_id), timeout=5)).state != fpb.ROLLOUT_STATE_IN_PROGRESS and r,
        what="the rollout")
    assert final.state == fpb.ROLLOUT_STATE_SUCCEEDED and final.acked == 1
    assert list(executor_stub(cluster).Describe(epb.DescribeRequest(), timeout=5).achieved_experts_per_layer) == [2, 3]
    wait_until(lambda: any(e.event.kind == tpb.Event.KIND_PLAN_APPLIED for e in events), what="the event")
    stream.cancel()


def test_fleet_rejects_malformed_plans_and_unknown_nodes(cluster):
    with pytest.raises(grpc.RpcError) as error:
        fleet_stub(cluster).StartRollout(fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[1])),
                                         timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plan.experts_per_layer" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        fleet_stub(cluster).StartRollout(fpb.StartRolloutRequest(node_ids=["nope"]), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in error.value.details()
    nodes = fleet_stub(cluster).ListNodes(fpb.ListNodesRequest(), timeout=10).nodes
    assert [n.status.node_id for n in nodes] == [NODE]


def test_a_pinned_plan_survives_a_budget_change_and_a_push_without_a_plan_unpins(cluster):
    rollout = fleet_stub(cluster).StartRollout(fpb.StartRolloutRequest(
        node_ids=[NODE], plan=common_pb2.Plan(experts_per_layer=[2, 2])), timeout=10)
    wait_until(lambda: fleet_stub(cluster).GetRollout(fpb.GetRolloutRequest(rollout_id=rollout.rollout_id),
                                                      timeout=5).state == fpb.ROLLOUT_STATE_SUCCEEDED, what="the pin")
    pinned = node_status(cluster)
    assert pinned.pinned and list(pinned.acked_plan.experts_per_layer) == [2, 2]
    executor_stub(cluster).SetBudget(epb.SetBudgetRequest(budget_bytes=(1 << 30) - 1, reason="test"), timeout=10)
    wait_until(lambda: node_status(cluster).budget_bytes == (1 << 30) - 1, what="the budget change")
    assert node_status(cluster).desired_plan == pinned.desired_plan
    fleet_stub(cluster).StartRollout(fpb.StartRolloutRequest(node_ids=[NODE]), timeout=10)
    unpinned = wait_until(lambda: (s := node_status(cluster)).state == ppb.PLAN_STATE_ACKED
                          and s.acked_plan.version > pinned.acked_plan.version and s, what="the planner's own plan")
    assert not unpinned.pinned and list(unpinned.acked_plan.experts_per_layer) != [2, 2]


def test_a_device_side_budget_cut_makes_the_planner_replan(cluster):
    d = executor_stub(cluster).Describe(epb.DescribeRequest(), timeout=5)
    # Three experts per layer at the checkpoint's precision beside a full batch (the planner's plans
    # leave room for one; the minimum budget is one expert per layer at its smallest precision).
    smallest = sum(min(l.bytes_per_expert, *(p.bytes_per_expert for p in l.precisions)) for l in d.layout.layers)
    budget = d.min_budget_bytes - smallest + d.reserve.batch_bytes + 3 * sum(l.bytes_per_expert for l in d.layout.layers)
    before = node_status(cluster).desired_plan.version
    executor_stub(cluster).SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="test"), timeout=10)
    status = wait_until(lambda: (s := node_status(cluster)).desired_plan.version > before
                        and s.state == ppb.PLAN_STATE_ACKED and s, what="the replan")
    assert list(status.acked_plan.experts_per_layer) == [3, 3] and status.budget_bytes == budget
    executor_stub(cluster).SetBudget(epb.SetBudgetRequest(budget_bytes=1 << 30), timeout=10)
    wait_until(lambda: (s := node_status(cluster)).budget_bytes == 1 << 30 and s.state == ppb.PLAN_STATE_ACKED,
               what="the replan for the restored budget")


def test_the_executor_keeps_its_plan_while_the_planner_is_away_and_resyncs(cluster, tmp_path):
    old = cluster["planner"]
    port = old.address.rsplit(":", 1)[1]
    settled = wait_until(lambda: (s := node_status(cluster)) and s.state == ppb.PLAN_STATE_ACKED and s,
                         what="earlier plans to settle")  # e.g. the replan after the last budget change
    kept = executor_stub(cluster).Describe(epb.DescribeRequest(), timeout=5).plan
    assert kept == settled.acked_plan
    assert old.stop() == 0, "the planner should shut down gracefully"
    time.sleep(1.0)
    during = executor_stub(cluster).Describe(epb.DescribeRequest(), timeout=5).plan
    assert during == kept
    list(executor_stub(cluster).Generate(epb.GenerateRequest(text="still serving", max_new_tokens=3), timeout=30))
    cluster["planner"] = spawn("planner", ["planner", "serve", "--port", port], log_dir=tmp_path)
    status = wait_until(lambda: (s := node_status(cluster)) and s.connected and s.state == ppb.PLAN_STATE_ACKED and s,
                        timeout=30, what="the resync")
    assert status.acked_plan.version >= kept.version
    assert executor_stub(cluster).Describe(epb.DescribeRequest(), timeout=5).plan == status.acked_plan


def test_malformed_budget_on_the_command_line_is_a_clear_error(tiny_model_dir):
    result = subprocess.run(swapmoe_command("executor", "serve", "--model", str(tiny_model_dir), "--budget", "lots"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--budget: malformed size 'lots'" in result.stderr


def test_a_restarted_executor_process_resumes_its_plan_and_serves_metrics(tiny_model_dir, tmp_path):
    args = ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB", "--port", "0",
            "--state-dir", str(tmp_path / "state"), "--metrics-port", "0", "--drain-seconds", "5"]
    first = spawn("executor-1", args, log_dir=tmp_path)
    try:
        with transport.channel(first.address) as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            assert stub.ApplyPlan(epb.ApplyPlanRequest(plan=common_pb2.Plan(version=4, experts_per_layer=[3, 2])),
                                  timeout=10).accepted
            list(stub.Generate(epb.GenerateRequest(text="count me", max_new_tokens=4), timeout=30))
        url = next(line.split()[-1] for line in first.output if line.startswith("metrics on "))
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        assert re.search(r'^swapmoe_generation_tokens_total\{.*node="[^"]+".*\} 4\.0$', metrics, re.MULTILINE), metrics
    finally:
        assert first.stop() == 0, "the executor should drain and exit cleanly"
    second = spawn("executor-2", args, log_dir=tmp_path)
    try:
        with transport.channel(second.address) as channel:
            described = executor_pb2_grpc.ExecutorServiceStub(channel).Describe(epb.DescribeRequest(), timeout=10)
        assert described.plan.version == 4 and list(described.achieved_experts_per_layer) == [3, 2]
    finally:
        second.stop()


def test_planner_serve_with_a_control_port_says_where_and_answers_there(tmp_path):
    planner_process = spawn("planner-control", ["planner", "serve", "--port", "0", "--control-port", "0"],
                            log_dir=tmp_path)
    try:
        note = wait_until(lambda: next((line for line in planner_process.output if "control RPCs and health" in line),
                                       None), timeout=10, what="the control port's line")
        control = note.split(" also on ")[1].strip()
        assert control != planner_process.address
        with transport.channel(control) as channel:
            status = planner_pb2_grpc.PlannerServiceStub(channel).GetPlanStatus(ppb.PlanStatusRequest(), timeout=5)
            assert status.summary.total == 0
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        assert planner_process.stop() == 0
