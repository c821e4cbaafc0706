"""The device profile (paper section 3.3, appendix A) and the update-frequency sweep (section
3.4.1): measured by a real executor on tiny checkpoints, over its own Profile RPC and through the
planner's Connect stream from an executor process, as a device behind NAT would be profiled."""

import dataclasses
import threading

import grpc
import pytest

from swapmoe.core.device_profile import DeviceProfile, OnDemandPoint, SweepPoint
from swapmoe.core.layout import DeviceInfo, LayerLayout, ModelLayout
from swapmoe.core.fingerprint import model_fingerprint
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.device_profiling import ProfileSpec, batch_sizes, inflection, relative_spread
from swapmoe.executor.intra_op import thread_counts, usable_cores
from swapmoe.orchestration.processes import spawn
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import convert, transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until
from serving import own_engine, serving

# A sweep small enough for a test: 2 of 8 experts resident, so updates really load.
SMALL = dict(token_counts=[1, 4], repeats=2, update_frequencies=[0, 8, 2], sweep_tokens=8, experts_per_layer=[2, 2])
LONG = dict(token_counts=[64] * 16, repeats=100)  # a profile that runs until stopped


@pytest.fixture(scope="module")
def profiled_engine(tiny_model_dir):
    with own_engine(tiny_model_dir, "profiled") as engine:
        yield engine


@pytest.fixture(scope="module")
def executor(profiled_engine):
    with serving(profiled_engine) as channel:
        yield executor_pb2_grpc.ExecutorServiceStub(channel)


@pytest.fixture(scope="module")
def planner_address_and_stub():
    server, registry = serve_planner()
    with transport.channel(f"127.0.0.1:{server.port}") as channel:
        yield f"127.0.0.1:{server.port}", planner_pb2_grpc.PlannerServiceStub(channel)
    server.stop(grace=1)


def profile(stub, **fields) -> epb.ProfileResult:
    progress = list(stub.Profile(epb.ProfileRequest(**fields), timeout=60))
    assert progress[-1].fraction == 1.0 and progress[-1].HasField("result")
    return progress[-1].result


# --- the inflection point, on hand-made sweeps ---------------------------------------------------
def sweep(latencies: dict[int, int]) -> list[SweepPoint]:
    return [SweepPoint(f, ns, 1e9 / ns, 0.0) for f, ns in latencies.items()]


@pytest.mark.parametrize("latencies, expected", [
    ({0: 100, 64: 101, 32: 99, 16: 102, 8: 100, 4: 103, 2: 101, 1: 104}, 1),  # flat: update every token
    ({0: 100, 64: 100, 32: 101, 16: 100, 8: 102, 4: 104, 2: 130, 1: 190}, 4),  # rising below 4
    ({0: 100, 64: 100, 32: 101, 16: 150, 8: 100, 4: 101, 2: 102, 1: 103}, 32),  # every less frequent one must hold
    ({0: 100, 64: 140, 32: 150, 8: 200}, 64),  # even the least frequent is slow: the least frequent
    ({0: 100}, 0),  # nothing but the baseline
])
def test_the_inflection_is_the_most_frequent_update_rate_that_costs_no_latency(latencies, expected):
    assert inflection(sweep(latencies), tolerance=0.05) == expected


def test_the_tolerance_widens_the_inflection_and_order_of_points_does_not_matter():
    points = sweep({2: 108, 0: 100, 8: 104, 4: 106})
    assert inflection(points, 0.05) == 8
    assert inflection(points, 0.10) == 2


@pytest.mark.parametrize("most, sizes", [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8))])
def test_decode_is_measured_at_powers_of_two_up_to_the_most_rows_and_at_the_most(most, sizes):
    assert batch_sizes(most) == sizes


def test_the_sweep_always_starts_from_the_baseline_then_descends():
    assert ProfileSpec(update_frequencies=(2, 16, 2, 4)).frequencies == (0, 16, 4, 2)


# --- the Profile RPC --------------------------------------------------------------------------------
def test_profile_returns_a_full_device_profile(executor, profiled_engine, tiny_model_dir):
    result = profile(executor, **SMALL)
    layout = profiled_engine.layout
    assert result.node_id == "profiled" and result.model_fingerprint == model_fingerprint(tiny_model_dir)
    assert convert.layout_from_pb(result.layout) == layout and result.device.kind == "cpu"
    assert len(result.layers) == layout.num_layers
    intermediate = profiled_engine.model.config.intermediate_size
    for layer, spec in zip(result.layers, layout.layers):
        assert layer.bytes_per_expert == spec.bytes_per_expert
        assert layer.activation_bytes_per_token == 3 * intermediate * 4  # gate_up (2I) + product (I), float32
        assert [c.tokens for c in layer.compute] == [1, 4] and all(c.expert_forward_ns > 0 for c in layer.compute)
    assert [l.tier for l in result.loads] == [profiled_engine.load_tier]
    assert result.loads[0].expert_load_ns > 0 and result.loads[0].bytes_per_second > 0
    assert result.decode_step_ns > 0 and 0 <= result.dense_forward_ns <= result.decode_step_ns
    # decode through the serving step at every batch size the budget allows (1 GiB: a full batch of 8)
    assert profiled_engine.scheduler.limit == 8
    assert [(b.rows, b.step_ns > 0) for b in result.batch_decode] == [(1, True), (2, True), (4, True), (8, True)]
    assert result.batch_decode[0].step_ns == result.decode_step_ns
    # a decode pass at each thread count, with a load beside it, and the count chosen among them
    assert [(t.threads, t.step_ns > 0) for t in result.thread_points] == [(n, True) for n in thread_counts(usable_cores())]
    assert result.threads in thread_counts(usable_cores())
    assert list(result.sweep_experts_per_layer) == [2, 2]
    assert [p.update_frequency for p in result.sweep] == [0, 8, 2]
    assert all(p.inter_token_ns > 0 and p.tokens_per_second > 0 for p in result.sweep)
    assert result.sweep[0].loads_per_token == 0 and result.sweep[-1].loads_per_token > 0  # 2 of 8 resident: updates load
    assert result.inflection_update_frequency in (8, 2)
    # on-demand at 2 of 8 experts: misses are loaded synchronously, and their cost comes out of it
    assert result.on_demand.inter_token_ns > 0 and result.on_demand.misses_per_token > 0
    assert convert.device_profile_from_pb(result).miss_ns() is not None
    assert profiled_engine.experts.strategy is profiled_engine.plan.strategy  # the plan's strategy is back
    # the fields older readers use still hold the first tier and the first layer
    assert result.load_tier == result.loads[0].tier and list(result.compute) == list(result.layers[0].compute)
    assert list(result.bytes_per_expert) == [l.bytes_per_expert for l in layout.layers]
    assert convert.device_profile_to_pb(convert.device_profile_from_pb(result)) == result


def test_a_decode_pass_is_measured_at_each_precision_the_store_keeps_and_the_plans_precision_is_back(
        executor, profiled_engine):
    layout = profiled_engine.layout
    plan = profiled_engine.plan
    version = plan.version + 1
    assert layout.precisions and profiled_engine.apply_plan(  # a plan at int8 when the profile starts
        dataclasses.replace(plan, version=version, precision=("int8",) * layout.num_layers)).accepted
    try:
        result = profile(executor, **SMALL)
        assert [(p.precision, p.step_ns > 0) for p in result.precision_points] == \
            [(p, True) for p in ("", *layout.precisions)]
        assert list(result.sweep_precision) == ["int8"] * layout.num_layers  # what the sweep ran at
        assert profiled_engine.experts.precisions == ("int8",) * layout.num_layers
    finally:
        assert profiled_engine.apply_plan(dataclasses.replace(plan, version=version + 1)).accepted
    assert profiled_engine.experts.precisions == ("",) * layout.num_layers


def test_a_precision_whose_one_expert_per_layer_the_budget_cannot_hold_is_not_measured(executor, profiled_engine):
    """Budgets are promises while profiling too: under a budget that holds the experts only at
    int4, the checkpoint's precision is left out of the points rather than run over budget."""
    layout, budget = profiled_engine.layout, profiled_engine.budget_bytes
    tight = profiled_engine.memory_model.plan_bytes((1,) * layout.num_layers, 1) - 1  # one float32 expert each: over
    profiled_engine.set_budget(tight)
    try:
        assert profiled_engine.plan.precision == layout.smallest_precision
        result = profile(executor, **SMALL)
        assert "" not in [p.precision for p in result.precision_points]
        assert profiled_engine.memory().accounted_bytes <= tight
    finally:
        profiled_engine.set_budget(budget)


def test_a_miss_costs_what_on_demand_generation_adds_to_the_baseline_per_miss():
    profile = _stored_profile()
    assert profile.miss_ns() == pytest.approx((1_900_000 - 1_000_000) / 0.5)
    assert dataclasses.replace(profile, on_demand=None).miss_ns() is None


def _stored_profile() -> DeviceProfile:
    layout = ModelLayout("mixtral", "MixtralForCausalLM", (LayerLayout(0, "layers.0", 8, 2, 1000),), 5000)
    return DeviceProfile("n", DeviceInfo("cpu", "x", 1 << 30, 2), "abc", layout, (), (), 0, 0, (4,),
                         tuple(SweepPoint(f, ns, 1e9 / ns, 0.0) for f, ns in ((0, 1_000_000), (8, 1_100_000))), 8,
                         OnDemandPoint(1_900_000, 0.5))


def test_the_sweep_gives_the_slots_back_to_the_plan_in_force(executor, profiled_engine):
    before = profiled_engine.achieved
    profile(executor, **SMALL)
    assert profiled_engine.achieved == before == tuple(profiled_engine.plan.experts_per_layer)


def test_without_a_residency_the_sweep_runs_the_plan_in_force(executor, profiled_engine):
    result = profile(executor, token_counts=[1], repeats=1, update_frequencies=[0, 4], sweep_tokens=4)
    assert tuple(result.sweep_experts_per_layer) == tuple(profiled_engine.plan.experts_per_layer)
    assert [p.update_frequency for p in result.sweep] == [0, 4]


def test_a_switch_profile_has_a_layer_per_encoder_and_decoder_moe_layer(checkpoint_dirs):
    with Engine(EngineConfig(checkpoint_dirs("switch_transformers"), budget_bytes=1 << 30, node_id="sw")) as switch:
        spec = ProfileSpec(token_counts=(1,), repeats=1, update_frequencies=(0, 2), sweep_tokens=4,
                           experts_per_layer=(2, 2))
        result = [p for p in switch.profile(spec)][-1].result
        assert len(result.layers) == switch.layout.num_layers == 2
        d_ff = switch.model.config.d_ff
        assert all(l.activation_bytes_per_token == d_ff * 4 for l in result.layers)  # wi's output, float32
        assert [p.update_frequency for p in result.sweep] == [0, 2]
        assert [b.rows for b in result.batch_decode] == [1]  # encoder-decoder models decode one at a time
        assert switch.achieved == tuple(switch.plan.experts_per_layer)


@pytest.mark.parametrize("fields, field", [
    (dict(update_frequencies=list(range(17))), "update_frequencies"),
    (dict(update_frequencies=[0, 2**21]), "update_frequencies[1]"),
    (dict(sweep_tokens=1), "sweep_tokens"),
    (dict(sweep_tokens=10**6), "sweep_tokens"),
    (dict(experts_per_layer=[2]), "experts_per_layer"),
    (dict(experts_per_layer=[9, 2]), "experts_per_layer[0]"),
    (dict(experts_per_layer=[2, 0]), "experts_per_layer[1]"),
    (dict(experts_per_layer=[2] * 2000), "experts_per_layer"),
    (dict(token_counts=[0]), "token_counts[0]"),
    (dict(repeats=101), "repeats"),
])
def test_bad_profile_fields_are_invalid_argument_naming_the_field(executor, fields, field):
    with pytest.raises(grpc.RpcError) as error:
        list(executor.Profile(epb.ProfileRequest(**fields), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()


def test_a_sweep_residency_over_the_budget_is_invalid(profiled_engine):
    plan = profiled_engine.plan
    profiled_engine.set_budget(profiled_engine.min_budget_bytes)
    try:
        with pytest.raises(ValueError, match="^experts_per_layer: plan needs"):
            next(profiled_engine.profile(ProfileSpec(experts_per_layer=(8, 8))))
    finally:
        profiled_engine.set_budget(1 << 30)
        assert profiled_engine.apply_plan(plan.with_version(profiled_engine.plan.version + 1)).accepted


# --- through the planner's Connect stream -------------------------------------------------------
def ask(stub, node_id, timeout_s=60, **fields) -> ppb.ProfileExecutorResponse:
    request = ppb.ProfileExecutorRequest(node_id=node_id, request=epb.ProfileRequest(**fields), timeout_s=timeout_s)
    return stub.ProfileExecutor(request, timeout=90)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        fn()
    return error.value


@pytest.mark.slow
def test_a_device_profile_arrives_through_the_connect_stream_of_an_executor_process(planner_address_and_stub,
                                                                                    tiny_model_dir, tmp_path):
    address, stub = planner_address_and_stub
    process = spawn("executor", ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB",
                                 "--port", "0", "--planner", address, "--node-id", "behind-nat"], log_dir=tmp_path)
    try:
        wait_until(lambda: stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).executors, what="the executor")
        result = ask(stub, "behind-nat", **SMALL).result
        assert result.node_id == "behind-nat" and result.model_fingerprint == model_fingerprint(tiny_model_dir)
        assert len(result.layers) == len(result.layout.layers) == 2
        assert [p.update_frequency for p in result.sweep] == [0, 8, 2]
        assert result.inflection_update_frequency in (8, 2) and result.loads[0].expert_load_ns > 0
        status = stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=["behind-nat"]), timeout=5).executors[0]
        assert status.connected  # the stream carried the profile and stays open
    finally:
        process.stop()


def test_an_unknown_node_is_not_found(planner_address_and_stub):
    error = rpc_error(lambda: ask(planner_address_and_stub[1], "nobody", **SMALL))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "nobody" in error.details()


@pytest.mark.parametrize("request_, field", [
    (ppb.ProfileExecutorRequest(node_id=""), "node_id"),
    (ppb.ProfileExecutorRequest(node_id="x", timeout_s=10**6), "timeout_s"),
    (ppb.ProfileExecutorRequest(node_id="x", request=epb.ProfileRequest(repeats=10**6)), "request.repeats"),
    (ppb.ProfileExecutorRequest(node_id="x", request=epb.ProfileRequest(update_frequencies=[2**30])),
     "request.update_frequencies[0]"),
])
def test_bad_profile_executor_fields_are_invalid_argument_naming_the_field(planner_address_and_stub, request_, field):
    error = rpc_error(lambda: planner_address_and_stub[1].ProfileExecutor(request_, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(field), error.details()


@pytest.fixture(scope="module")
def linked_engine(tiny_model_dir, tmp_path_factory):
    """Keeps its node secret in a state directory, as a deployed executor does: each test's new link
    (a restarted executor) proves it is the node the planner knows."""
    config = EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="linked",
                          state_dir=tmp_path_factory.mktemp("linked-state"))
    with Engine(config) as engine:
        yield engine


@pytest.fixture
def linked(planner_address_and_stub, linked_engine):
    """An in-process executor connected to the planner as node ``linked``."""
    link = PlannerLink(linked_engine, planner_address_and_stub[0]).start()
    assert link.connected.wait(30)
    yield link
    link.stop()


@pytest.mark.slow
def test_a_profile_past_its_timeout_is_deadline_exceeded_and_stops_on_the_executor(planner_address_and_stub,
                                                                                   linked_engine, linked):
    engine = linked_engine
    error = rpc_error(lambda: ask(planner_address_and_stub[1], "linked", timeout_s=1, **LONG))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "1 s" in error.details()
    wait_until(lambda: engine.running == 0, what="the executor to stop profiling")


def test_an_executor_that_disconnects_while_profiling_is_unavailable(planner_address_and_stub, linked_engine,
                                                                     linked):
    engine = linked_engine
    errors = []
    stub = planner_address_and_stub[1]
    asker = threading.Thread(target=lambda: errors.append(rpc_error(lambda: ask(stub, "linked", **LONG))))
    asker.start()
    wait_until(lambda: engine.running == 1, what="the profile's turn")
    linked.stop()
    asker.join(30)
    assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE and "disconnected" in errors[0].details()
    wait_until(lambda: engine.running == 0, what="the executor to stop profiling")


def test_a_failed_profile_keeps_its_status_and_the_executors_message(planner_address_and_stub, linked):
    error = rpc_error(lambda: ask(planner_address_and_stub[1], "linked", experts_per_layer=[9, 2]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "experts_per_layer[0]" in error.details()


def test_the_noise_allowance_ignores_one_slowed_repeat():
    assert relative_spread([100, 100, 101, 99, 300]) == pytest.approx(0.01)
    assert relative_spread([100, 110, 90, 120, 80]) == pytest.approx(0.1)
