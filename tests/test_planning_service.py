"""The planner plans, with real processes on loopback: the bundled LM's executor is profiled
through its Connect stream and gets searched plans; a budget cut gets a plan that fits; the
domain of the prompts decides the workload planned for, without flapping on a mix; a
restarted planner keeps what it knew; a model without a profile gets the even split."""

import dataclasses
import io
import itertools
import shutil
from pathlib import Path

import grpc
import pytest

from swapmoe.core.budget import MemoryModel
from swapmoe.core.sizes import format_size
from swapmoe.models.bundled import LM_DIR, PROFILES  # the profiles shipped with the bundled models
from swapmoe.cli import client
from swapmoe.orchestration.processes import spawn
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.registry import Registry
from swapmoe.planner_service.search import SearchSettings
from swapmoe.planner_service.server import serve
from swapmoe.planner_service.state import PlannerState
from swapmoe.planner_service.workload import Hysteresis
from swapmoe.profiler.workloads import rows
from swapmoe.rpc import convert, transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until

pytestmark = pytest.mark.slow

NODE = "lm-1"
BUDGET = 96 << 20  # the bundled LM: room for a full batch and a choice of experts per layer
SETTINGS = PlannerSettings(  # no profile roots: the bundled LM's profile ships with it
    search=SearchSettings(population=16, generations=12),
    frontier_points=8,
    # A short device profile: one token count, the sweep at two frequencies.
    profile_request=epb.ProfileRequest(token_counts=[1, 4], repeats=2, update_frequencies=[16, 4], sweep_tokens=12),
    hysteresis=Hysteresis(window=3, min_tokens=32, confirm=2),
)


class Planner:
    """An in-process planner (a real gRPC server) that can be restarted on its port, with a log
    of every plan it decided on: (node, version, origin, why)."""

    def __init__(self, state_dir: Path):
        self.state_dir, self.port, self.sent = state_dir, 0, []
        self.start()

    def start(self):
        self.state = state = PlannerState(self.state_dir)

        def persist(record):
            state.save(record)
            entry = (record.node_id, record.desired.version, record.desired.origin, record.reason) \
                if record.desired else None
            if entry and entry not in self.sent:
                self.sent.append(entry)

        planning = dataclasses.replace(SETTINGS, state_dir=self.state_dir)
        self.server, self.registry = serve(f"127.0.0.1:{self.port}", Registry(state.load(), persist, planning))
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(0)
        self.registry.policy.close()
        self.state.close()  # what is written behind reaches the database

    def status(self, node=NODE):
        stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(self.address))
        try:
            return stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[node]), timeout=5).executors[0]
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None


@pytest.fixture(scope="module")
def restartable_planner(tmp_path_factory):
    p = Planner(tmp_path_factory.mktemp("planner-state"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def lm(restartable_planner, tmp_path_factory):
    service = spawn("executor", ["executor", "serve", "--model", str(LM_DIR), "--budget", str(BUDGET), "--port", "0",
                                 "--planner", restartable_planner.address, "--node-id", NODE,
                                 "--state-dir", str(tmp_path_factory.mktemp("executor-state"))],
                    log_dir=tmp_path_factory.mktemp("logs"))
    yield service
    service.stop()


def executor(service):
    return executor_pb2_grpc.ExecutorServiceStub(transport.channel(service.address))


def acked_search(planner, workload=None, budget=None, after: int = 0):
    """The status once a searched plan (for ``workload``, fitting ``budget``, newer than version
    ``after``) is ACKed."""
    def ready():
        s = planner.status()
        if not s or s.state != ppb.PLAN_STATE_ACKED or not s.desired_plan.origin.startswith("planner:search"):
            return None
        if workload and f"workload={workload} " not in s.desired_plan.origin:
            return None
        if budget and s.budget_bytes != budget:
            return None
        if s.acked_plan.version <= after:  # the status knows the new budget before its plan is ACKed
            return None
        return s
    return wait_until(ready, timeout=120, what=f"a searched plan for {workload or 'any workload'} ACKed")


def generate(service, domain: str, requests: int = 2, start: int = 0):
    """Prompts from the judging texts of ``domain`` (never used to profile)."""
    texts = rows(domain, "judging")
    for i in range(requests):
        text = texts[(start + i) % len(texts)]["text"][:600]
        for _ in executor(service).Generate(epb.GenerateRequest(text=text, max_new_tokens=24), timeout=60):
            pass


def test_a_new_device_is_served_the_fallback_profiled_through_its_stream_then_gets_a_searched_plan(
        restartable_planner, lm):
    status = acked_search(restartable_planner, "mix")
    first = next(s for s in restartable_planner.sent if s[0] == NODE)
    assert first[2].startswith("planner:even-split") and "device profile profiling" in first[2]
    assert status.profile_state == "ready"
    assert status.predicted.workload == "mix" and status.predicted.accuracy_metric == "perplexity"
    assert status.predicted.memory_bytes <= status.budget_bytes == BUDGET
    assert "searched plan for workload 'mix'" in status.reason
    stored = list((restartable_planner.state_dir / "profiles").glob(f"*/devices/*{NODE}/device.json"))
    assert len(stored) == 1  # the device profile is kept for a restart


def test_a_budget_cut_gets_a_searched_plan_that_fits_and_is_acked(restartable_planner, lm):
    before = acked_search(restartable_planner)
    described = executor(lm).Describe(epb.DescribeRequest(), timeout=5)
    model = MemoryModel(convert.layout_from_pb(described.layout), convert.reserve_from_pb(described.reserve))
    budget = (model.smallest_plan_bytes + before.predicted.memory_bytes) // 2  # searched plans leave room for a full batch
    executor(lm).SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="thermal"), timeout=30)
    status = acked_search(restartable_planner, budget=budget, after=before.acked_plan.version)
    assert status.acked_plan.version > before.acked_plan.version
    assert status.predicted.memory_bytes <= budget
    assert f"budget change to {format_size(budget)}" in status.reason and "thermal" in status.reason
    memory = executor(lm).Describe(epb.DescribeRequest(), timeout=5).memory
    assert memory.accounted_bytes <= budget


def test_the_domain_of_the_prompts_decides_the_workload_planned_for(restartable_planner, lm):
    for domain in ("prose", "code", "prose"):
        was = restartable_planner.status().workload
        wait_until(lambda: generate(lm, domain) or restartable_planner.status().workload == domain, timeout=120,
                   what=f"the planner to recognise {domain}")
        status = wait_until(lambda: (s := restartable_planner.status()).predicted.workload == domain
                            and s.state == ppb.PLAN_STATE_ACKED and s, what=f"the plan for {domain}")
        if was != domain:
            assert any(f"workload shift to '{domain}'" in why for _, _, _, why in restartable_planner.sent)
        # Sent, unless the executor already ran the very plan searched for this domain.
        assert f"workload={domain} " in status.desired_plan.origin or "runs it already" in status.reason


def test_a_mixed_stream_settles_without_flapping(restartable_planner, lm):
    domains, sent = ["code", "prose", "manual"], itertools.count()

    def mixed(requests: int):
        for _ in range(requests):
            i = next(sent)
            generate(lm, domains[i % 3], requests=1, start=i)

    # Reports come every second whatever the requests take: how many requests it takes to
    # recognise the mix depends on the machine's speed, so the stream goes on until it is.
    wait_until(lambda: mixed(3) or restartable_planner.status().workload == "mix", timeout=120,
               what="the planner to recognise the mix")
    shifts_before = {s[3] for s in restartable_planner.sent if "workload shift" in s[3]}
    mixed(18)
    shifts = {s[3] for s in restartable_planner.sent if "workload shift" in s[3]} - shifts_before
    assert not shifts, f"the workload shifted on a recognised mixed stream: {shifts}"
    assert restartable_planner.status().workload == "mix"


def test_a_restarted_planner_keeps_profiles_frontiers_and_plans_and_resends_nothing(restartable_planner, lm):
    before = acked_search(restartable_planner)
    sent = len(restartable_planner.sent)
    restartable_planner.stop()
    restartable_planner.start()
    status = wait_until(lambda: (s := restartable_planner.status()) and s.connected and s,
                        what="the executor to reconnect")
    assert status.profile_state == "ready"  # from the stored device profile: not measured again
    assert status.workload == before.workload and status.desired_plan == before.desired_plan
    assert status.predicted == before.predicted
    generate(lm, "manual", requests=1)  # traffic as before the restart: a mix of domains
    assert restartable_planner.status().acked_plan.version == before.acked_plan.version
    resent = restartable_planner.sent[sent:]
    assert [s[1] for s in resent] == [before.desired_plan.version] * len(resent)


def test_the_plan_status_command_shows_the_plan_prediction_measurements_workload_and_why(restartable_planner, lm):
    generate(lm, "code", requests=1)
    out = io.StringIO()
    wait_until(lambda: restartable_planner.status().HasField("throughput"), what="throughput telemetry")
    client.print_plan_status(restartable_planner.address, [NODE], out=out)
    text = out.getvalue()
    for part in (f"{NODE}: connected", "workload: ", "predicted: perplexity", "measured: ", "why: ",
                 "device profile: ready"):
        assert part in text, text


def test_concurrent_streams_get_a_plan_that_pays_for_rows_where_one_stream_got_none(restartable_planner, lm):
    from concurrent.futures import ThreadPoolExecutor

    alone = acked_search(restartable_planner)  # one request at a time so far: one row, every other byte in experts
    assert alone.acked_plan.rows == 1 and alone.predicted.offered_load == 1
    domains = ["code", "prose", "manual"]

    def burst():
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: generate(lm, domains[i % 3], requests=1, start=i), range(8)))

    busy = wait_until(lambda: burst() or ((s := restartable_planner.status()).predicted.offered_load >= 4
                                          and s.state == ppb.PLAN_STATE_ACKED and s),
                      timeout=180, what="a plan for the concurrent streams ACKed")
    assert any("offered load 1 -> " in why for node, _, _, why in restartable_planner.sent if node == NODE)
    assert busy.acked_plan.rows > 1 and busy.last_result.achieved_rows == busy.acked_plan.rows
    assert f"rows={busy.acked_plan.rows} load={busy.predicted.offered_load}" in busy.acked_plan.origin
    assert busy.predicted.throughput > alone.predicted.throughput
    # The rows are paid within the budget: by fewer experts, or (the planner may choose) a lower precision.
    assert executor(lm).Describe(epb.DescribeRequest(), timeout=5).memory.accounted_bytes <= busy.budget_bytes


def test_an_executor_of_a_model_with_no_profile_gets_the_even_split_and_says_why(restartable_planner, tiny_model_dir,
                                                                                 tmp_path_factory):
    service = spawn("tiny", ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB", "--port", "0",
                             "--planner", restartable_planner.address, "--node-id", "tiny-1"],
                    log_dir=tmp_path_factory.mktemp("logs"))
    try:
        status = wait_until(lambda: (s := restartable_planner.status("tiny-1"))
                            and s.state == ppb.PLAN_STATE_ACKED and s,
                            what="the fallback plan ACKed")
        assert status.desired_plan.origin.startswith("planner:even-split")
        assert "no accuracy profile of model" in status.desired_plan.origin
        assert not status.HasField("predicted") and status.profile_state == "none"
    finally:
        service.stop()


def test_a_profile_written_while_an_executor_stays_connected_is_picked_up(tmp_path, monkeypatch):
    """Profiling a paper-size model takes minutes; the executors already connected for its model
    get searched plans once it is written, without reconnecting."""
    from swapmoe.planner_service import policy as policy_module, server as server_module

    monkeypatch.setattr(policy_module, "RESCAN_S", 0.5)
    monkeypatch.setattr(server_module, "RESCAN_S", 0.5)
    roots, logs = tmp_path / "profiles", tmp_path / "logs"
    roots.mkdir()
    logs.mkdir()
    settings = dataclasses.replace(SETTINGS, accuracy_roots=(roots,), state_dir=tmp_path / "state",
                                   shipped_profiles=False)  # as for a model that ships none
    server, registry = serve("127.0.0.1:0", Registry(planning=settings))
    address = f"127.0.0.1:{server.port}"
    service = spawn("late", ["executor", "serve", "--model", str(LM_DIR), "--budget", str(BUDGET), "--port", "0",
                             "--planner", address, "--node-id", "late-1"], log_dir=logs)
    stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(address))

    def status():
        return stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=["late-1"]), timeout=5).executors[0]

    try:
        fallback = wait_until(lambda: registry.connected("late-1") and (s := status()).state == ppb.PLAN_STATE_ACKED
                              and s, what="the fallback plan ACKed")
        assert "no accuracy profile of model" in fallback.desired_plan.origin
        for fingerprint in PROFILES.iterdir():  # the profile is written while it stays connected
            shutil.copytree(fingerprint / "accuracy", roots / fingerprint.name / "accuracy")
        searched = wait_until(lambda: (s := status()).state == ppb.PLAN_STATE_ACKED
                              and s.desired_plan.origin.startswith("planner:search") and s,
                              timeout=120, what="a searched plan ACKed without reconnecting")
        assert searched.profile_state == "ready"
        assert registry.connected("late-1")
    finally:
        service.stop()
        server.stop(0)
        registry.policy.close()
