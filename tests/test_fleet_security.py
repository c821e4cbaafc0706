"""Every service behind TLS, mutual TLS and per-role tokens, as `swapmoe dev-certs` sets them up:
control RPCs refuse missing credentials (UNAUTHENTICATED) and the wrong role (PERMISSION_DENIED)
and change nothing; an executor dials its planner over mutual TLS with its own token."""

from __future__ import annotations

import argparse
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.server import serve as serve_executor
from swapmoe.cli.devcerts import make_dev_certs
from swapmoe.orchestration.fleet import serve as serve_fleet
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import security, transport
from swapmoe.v1 import (common_pb2, executor_pb2 as epb, executor_pb2_grpc, fleet_pb2 as fpb, fleet_pb2_grpc,
                        planner_pb2 as ppb, planner_pb2_grpc)

from polling import wait_until

# Every control RPC of every service, with a request that would change something if it were let in.
CONTROL_CALLS = {
    "executor": [("ApplyPlan", epb.ApplyPlanRequest(plan=common_pb2.Plan(version=10**6, experts_per_layer=[1, 1]))),
                 ("SetBudget", epb.SetBudgetRequest(budget_bytes=1 << 29)),
                 ("Profile", epb.ProfileRequest(repeats=1))],
    "planner": [("PushPlan", ppb.PushPlanRequest(plan=common_pb2.Plan(experts_per_layer=[1, 1]))),
                ("ProfileExecutor", ppb.ProfileExecutorRequest(node_id="secure-node"))],
    "planner-control": [("PushPlan", ppb.PushPlanRequest(plan=common_pb2.Plan(experts_per_layer=[1, 1]))),
                        ("ProfileExecutor", ppb.ProfileExecutorRequest(node_id="secure-node"))],
    "fleet": [("StartRollout", fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[1, 1]))),
              ("PauseRollout", fpb.RolloutActionRequest(rollout_id="rollout-1")),
              ("ResumeRollout", fpb.RolloutActionRequest(rollout_id="rollout-1")),
              ("AbortRollout", fpb.RolloutActionRequest(rollout_id="rollout-1"))],
}
STUBS = {"executor": executor_pb2_grpc.ExecutorServiceStub, "planner": planner_pb2_grpc.PlannerServiceStub,
         "planner-control": planner_pb2_grpc.PlannerServiceStub, "fleet": fleet_pb2_grpc.FleetServiceStub}


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_engine):
    certs = tmp_path_factory.mktemp("certs")
    make_dev_certs(certs)
    args = argparse.Namespace(security=certs)
    planner, _ = serve_planner("127.0.0.1:0", settings=PlannerSettings(profile_devices=False),
                               security=security.server_from_args(args, "planner"), control_address="127.0.0.1:0")
    planner_address = f"127.0.0.1:{planner.port}"
    executor = serve_executor(tiny_engine, "127.0.0.1:0", security=security.server_from_args(args, "executor"))
    link = PlannerLink(tiny_engine, planner_address, f"127.0.0.1:{executor.port}",
                       security=security.client_from_args(args, "executor", cert="executor")).start()
    fleet = serve_fleet([planner_address], "127.0.0.1:0", security=security.server_from_args(args, "fleet"),
                        planner_security=security.client_from_args(args, "control", cert="fleet"))
    addresses = {"executor": f"127.0.0.1:{executor.port}", "planner": planner_address,
                 "planner-control": f"127.0.0.1:{planner.control_port}", "fleet": f"127.0.0.1:{fleet.port}"}
    try:
        wait_until(link.connected.is_set, timeout=30, what="the executor's mutual-TLS stream to its planner")
        wait_until(lambda: tiny_engine.plan.origin.startswith("planner:"), timeout=30,
                   what="the planner's first plan applied (tests compare the plan before and after a call)")
        yield certs, addresses
    finally:
        link.stop()
        fleet.stop(0)
        executor.stop(0)
        planner.stop(0)


def channel(certs, address, token_role=None, cert="client"):
    """TLS with ``cert``'s client certificate, and the token of ``token_role`` (None: no token)."""
    client = security.client_from_args(argparse.Namespace(security=certs), token_role or "client", cert=cert)
    return transport.channel(address, client if token_role else dataclasses.replace(client, token=None))


@pytest.mark.parametrize("service, method, request_message",
                         [(s, m, r) for s, calls in CONTROL_CALLS.items() for m, r in calls])
def test_control_calls_refuse_missing_and_wrong_role_credentials_and_change_nothing(secured, tiny_engine, service,
                                                                                    method, request_message):
    certs, addresses = secured
    budget, plan = tiny_engine.budget_bytes, tiny_engine.plan
    for token_role, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("client", grpc.StatusCode.PERMISSION_DENIED),
                             ("viewer", grpc.StatusCode.PERMISSION_DENIED)):
        with channel(certs, addresses[service], token_role) as ch:
            call = getattr(STUBS[service](ch), method)
            with pytest.raises(grpc.RpcError) as error:
                answer = call(request_message, timeout=10)
                list(answer) if not hasattr(answer, "ListFields") else None  # a stream's status comes with its end
            assert error.value.code() == code, (token_role, error.value.details())
            assert method in error.value.details() and "control" in error.value.details()
    assert (tiny_engine.budget_bytes, tiny_engine.plan) == (budget, plan)
    with channel(certs, addresses["planner"], "control") as ch:
        status = planner_pb2_grpc.PlannerServiceStub(ch).GetPlanStatus(ppb.PlanStatusRequest(), timeout=10)
    assert not any(s.pinned for s in status.executors)


def test_each_role_reaches_what_it_is_for(secured):
    certs, addresses = secured
    with channel(certs, addresses["executor"], "client") as ch:
        assert executor_pb2_grpc.ExecutorServiceStub(ch).Describe(epb.DescribeRequest(), timeout=10).layout.layers
    with channel(certs, addresses["fleet"], "viewer") as ch:
        nodes = fleet_pb2_grpc.FleetServiceStub(ch).ListNodes(fpb.ListNodesRequest(), timeout=10).nodes
        assert [n.status.connected for n in nodes] == [True]
    with channel(certs, addresses["planner"], "control") as ch:
        pushed = planner_pb2_grpc.PlannerServiceStub(ch).PushPlan(ppb.PushPlanRequest(), timeout=10)
        assert len(pushed.executors) == 1
    with channel(certs, addresses["planner"], "client") as ch:  # a client cannot pose as an executor
        stream = planner_pb2_grpc.PlannerServiceStub(ch).Connect(iter([ppb.ExecutorMessage()]))
        with pytest.raises(grpc.RpcError) as error:
            next(stream)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("service", ["executor", "planner", "planner-control", "fleet"])
def test_plaintext_to_a_tls_server_fails_clearly_and_health_needs_no_token(secured, service):
    certs, addresses = secured
    with grpc.insecure_channel(addresses[service]) as ch:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(certs, addresses[service]) as ch:  # TLS with a client certificate, no token
        answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_refuses_a_client_without_a_certificate(secured):
    certs, addresses = secured
    credentials = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with grpc.secure_channel(addresses["planner"], credentials) as ch:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_servers_refuse_a_public_address_without_tls_unless_told_it_is_insecure(tiny_engine):
    with pytest.raises(ValueError, match="--host"):
        serve_planner("0.0.0.0:0", settings=PlannerSettings(profile_devices=False))
    with pytest.raises(ValueError, match="--host"):
        serve_executor(tiny_engine, "0.0.0.0:0")
    server, _ = serve_planner("0.0.0.0:0", settings=PlannerSettings(profile_devices=False),
                              security=security.ServerSecurity(insecure=True))
    server.stop(0)


def test_generating_through_the_fleet_takes_only_a_client_token(secured, tiny_engine):
    """`generate --fleet` once needed the control token (ListNodes was control and viewer only), which
    it then sent to whichever executor it picked: now the client token lists nodes and generates."""
    from swapmoe.executor.planner_link import default_labels
    from swapmoe.orchestration.balancing import Router

    certs, addresses = secured
    router = Router(addresses["fleet"], channel_factory=lambda address: channel(certs, address, "client"))
    request = epb.GenerateRequest(text="def f(x):", max_new_tokens=3)
    chunks = list(router.generate(default_labels(tiny_engine)["model"], request))
    assert chunks[-1].usage.completion_tokens == 3
    with channel(certs, addresses["fleet"], "client") as ch:  # a client lists, but starts no rollout
        with pytest.raises(grpc.RpcError) as error:
            fleet_pb2_grpc.FleetServiceStub(ch).StartRollout(fpb.StartRolloutRequest(), timeout=10)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
