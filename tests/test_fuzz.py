"""Every RPC of every service, fed thousands of random and mutated messages (hypothesis, driven by
the protobuf descriptors): each answer is OK or a clear status with a message, never INTERNAL or
UNKNOWN, and each server stays healthy and answering after every call."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.executor.server import serve as serve_executor
from swapmoe.orchestration.fleet import serve as serve_fleet
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import transport
from swapmoe.v1 import (common_pb2, executor_pb2 as epb, executor_pb2_grpc, fleet_pb2 as fpb, fleet_pb2_grpc,
                        planner_pb2 as ppb, planner_pb2_grpc)

pytestmark = pytest.mark.slow

EXAMPLES = 150  # per RPC and kind (random, mutated field, mutated bytes): ~5,000 calls in all
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
STREAM_READS = 2  # responses read from a stream before it is cancelled
STREAM_SECONDS = 1.0  # a quiet stream (telemetry with nothing to say) ends at this deadline
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])

# --- strategies over protobuf descriptors ---------------------------------------------------
_INTS = {F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1), F.TYPE_UINT64: (0, 2**64 - 1),
         F.TYPE_FIXED64: (0, 2**64 - 1), F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1),
         F.TYPE_SFIXED32: (-2**31, 2**31 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
         F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1)}


def scalars(field: F) -> st.SearchStrategy:
    """Values of one scalar field, weighted toward the edges that break arithmetic."""
    if field.type in _INTS:
        low, high = _INTS[field.type]
        edges = sorted(e for e in {low, -1, 0, 1, 2, 7, 64, 4096, 2**31 - 1, 2**32 - 1, 2**53, high} if low <= e <= high)
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        width = 32 if field.type == F.TYPE_FLOAT else 64
        return st.one_of(st.sampled_from([0.0, 1e-38, -1.0, math.inf, math.nan, 1e30]), st.floats(width=width))
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "x" * 5000, "☃" * 300]))
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=40)
    if field.type == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99, -1])
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def messages(draw, descriptor, depth: int = 0):
    """A random message of ``descriptor``: each field set or not, repeated ones 0 to 4 times."""
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        nested = field.type == F.TYPE_MESSAGE
        if nested and field.message_type.GetOptions().map_entry:  # a map<string, string>: labels
            keys = st.text(st.characters(codec="utf-8"), max_size=70)
            getattr(msg, field.name).update(draw(st.dictionaries(keys, keys, max_size=4)))
            continue
        if nested and depth >= 3:
            continue
        value = messages(field.message_type, depth + 1) if nested else scalars(field)
        if field.is_repeated:
            for item in draw(st.lists(value, max_size=4)):
                getattr(msg, field.name).add().CopyFrom(item) if nested else getattr(msg, field.name).append(item)
        elif nested:
            getattr(msg, field.name).CopyFrom(draw(value))
        else:
            setattr(msg, field.name, draw(value))
    return msg


def _scalar_paths(msg, prefix=()):
    """(path, field) of every set scalar field of ``msg``, nested ones included."""
    for field, value in msg.ListFields():
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            continue  # labels: drawn whole by messages()
        if field.type == F.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for i, item in enumerate(items):
                yield from _scalar_paths(item, prefix + ((field.name, i if field.is_repeated else None),))
        else:
            yield prefix + ((field.name, None),), field


@st.composite
def mutated_fields(draw, seed):
    """``seed`` with one set scalar field (at any depth) replaced by an edge or random value."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    path, field = draw(st.sampled_from(list(_scalar_paths(seed))))
    holder = msg
    for name, index in path[:-1]:
        holder = getattr(holder, name)[index] if index is not None else getattr(holder, name)
    name = path[-1][0]
    if field.is_repeated:
        values = getattr(holder, name)
        values[draw(st.integers(0, len(values) - 1))] = draw(scalars(field))
    else:
        setattr(holder, name, draw(scalars(field)))
    return msg


@st.composite
def mutated_bytes(draw, seed):
    """``seed``'s wire bytes with a few bytes flipped, inserted or cut, when they still parse."""
    data = bytearray(seed.SerializeToString())
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = bytes([draw(st.integers(0, 255))])
        elif data:
            del data[at]
    try:
        return type(seed).FromString(bytes(data))
    except DecodeError:
        assume(False)


# --- the services under fuzz ------------------------------------------------------------------
@pytest.fixture(scope="module")
def services(tiny_model_dir, tmp_path_factory):
    config = EngineConfig(tiny_model_dir, budget_bytes=1 << 30, node_id="fuzzed", max_context=48,
                          state_dir=tmp_path_factory.mktemp("fuzz-executor"))
    with Engine(config) as engine:
        executor = serve_executor(engine)
        planner, _ = serve_planner(state_dir=tmp_path_factory.mktemp("fuzz-planner"))
        fleet = serve_fleet([f"127.0.0.1:{planner.port}"])
        link = PlannerLink(engine, f"127.0.0.1:{planner.port}").start()  # one real executor in the registry
        channels = {name: transport.channel(f"127.0.0.1:{server.port}")
                    for name, server in (("executor", executor), ("planner", planner), ("fleet", fleet))}
        link.connected.wait(30)
        yield engine, link, channels
        link.stop()
        for channel in channels.values():
            channel.close()
        for server in (fleet, planner, executor):
            server.stop(grace=1)


def fake_registration(link) -> ppb.Registration:
    """The real executor's registration under another node id, without a secret."""
    reg = link.registration()
    reg.node_id, reg.node_secret = "fuzz-fake", ""
    return reg


def seeds(engine, link):
    """One valid request per RPC, for the mutations to start from."""
    plan = common_pb2.Plan(version=7, experts_per_layer=[2, 2], update_frequency=4,
                           strategy=common_pb2.NON_RESIDENT_STRATEGY_MASKED_GATING, origin="fuzz")
    return {
        "Generate": epb.GenerateRequest(text="def f(x):", max_new_tokens=4, stop=["\n"], request_id="r",
                                        sampling=epb.SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=1)),
        "Subscribe": epb.SubscribeRequest(interval_ms=50, topics=[1, 2]),
        "ApplyPlan": epb.ApplyPlanRequest(plan=plan),
        "SetBudget": epb.SetBudgetRequest(budget_bytes=1 << 30, reason="fuzz"),
        "Describe": epb.DescribeRequest(),
        "Profile": epb.ProfileRequest(token_counts=[1, 4], repeats=2),
        "Connect": ppb.ExecutorMessage(registration=fake_registration(link)),
        "GetPlanStatus": ppb.PlanStatusRequest(node_ids=["fuzzed"]),
        "PushPlan": ppb.PushPlanRequest(node_ids=["fuzzed"], plan=plan),
        # A node that is not connected: a profile of the real one would outlast the calls' deadline.
        "ProfileExecutor": ppb.ProfileExecutorRequest(node_id="fuzz-absent", timeout_s=5, request=epb.ProfileRequest(
            token_counts=[1], repeats=1, update_frequencies=[0, 2], sweep_tokens=4, experts_per_layer=[2, 2])),
        "ForgetNodes": ppb.ForgetNodesRequest(node_ids=["fuzz-absent"]),
        "ListNodes": fpb.ListNodesRequest(selector="class=phone", page_size=10, view=ppb.STATUS_VIEW_BRIEF,
                                          connected_only=True),
        "StartRollout": fpb.StartRolloutRequest(node_ids=["fuzzed"], plan=plan, timeout_ms=1000, canary_nodes=1,
                                                wave_percents=[50, 100], max_failure_share=0.1, bake_ms=10,
                                                description="fuzz"),
        "GetRollout": fpb.GetRolloutRequest(rollout_id="rollout-1", page_size=10, summary_only=False),
        "ListRollouts": fpb.ListRolloutsRequest(),
        "PauseRollout": fpb.RolloutActionRequest(rollout_id="rollout-1", reason="fuzz"),
        "ResumeRollout": fpb.RolloutActionRequest(rollout_id="rollout-1", reason="fuzz"),
        "AbortRollout": fpb.RolloutActionRequest(rollout_id="rollout-1", reason="fuzz", rollback=True),
    }


SERVICES = {
    "executor": (epb.DESCRIPTOR.services_by_name["ExecutorService"], executor_pb2_grpc.ExecutorServiceStub),
    "planner": (ppb.DESCRIPTOR.services_by_name["PlannerService"], planner_pb2_grpc.PlannerServiceStub),
    "fleet": (fpb.DESCRIPTOR.services_by_name["FleetService"], fleet_pb2_grpc.FleetServiceStub),
}
RPCS = [(service, method.name, kind) for service, (descriptor, _) in SERVICES.items() for method in descriptor.methods
        for kind in ("random", "mutated field", "mutated bytes")
        if kind != "mutated field" or method.input_type.fields]  # an empty request has no field to mutate


def call(channel, service: str, method: str, request, registration=None) -> grpc.StatusCode:
    """Send ``request`` and read the answer (a few responses of a stream, then cancel); its status.
    On Connect, a message other than a registration follows ``registration``."""
    descriptor, stub_class = SERVICES[service]
    rpc = getattr(stub_class(channel), method)
    spec = descriptor.methods_by_name[method]
    try:
        if spec.client_streaming:
            alone = request.WhichOneof("message") in (None, "registration")
            sent = [request] if alone else [ppb.ExecutorMessage(registration=registration), request]
            stream = rpc(iter(sent), timeout=STREAM_SECONDS)
            list(zip(range(STREAM_READS), stream))
            stream.cancel()
        elif spec.server_streaming:
            stream = rpc(request, timeout=STREAM_SECONDS)
            list(zip(range(STREAM_READS), stream))
            stream.cancel()
        else:
            rpc(request, timeout=10)
    except grpc.RpcError as error:
        code = error.code()
        allowed = CLEAR | ({grpc.StatusCode.DEADLINE_EXCEEDED} if spec.server_streaming or spec.client_streaming
                           else set())
        assert code in allowed, f"{service}.{method} answered {code.name}: {error.details()}\n{request}"
        assert error.details(), f"{service}.{method} answered {code.name} without a message"
        return code
    return grpc.StatusCode.OK


def assert_healthy(channels):
    for name, channel in channels.items():
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, f"{name} is {status}"
    executor_pb2_grpc.ExecutorServiceStub(channels["executor"]).Describe(epb.DescribeRequest(), timeout=5)
    planner_pb2_grpc.PlannerServiceStub(channels["planner"]).GetPlanStatus(ppb.PlanStatusRequest(), timeout=5)


@pytest.mark.parametrize("service, method, kind", RPCS)
def test_every_answer_is_a_clear_status_and_the_server_stays_healthy(services, service, method, kind):
    engine, link, channels = services
    descriptor = SERVICES[service][0].methods_by_name[method].input_type
    seed = seeds(engine, link)[method]
    if kind == "random":
        strategy = messages(descriptor)
    elif kind == "mutated field":
        strategy = mutated_fields(seed)
    else:
        strategy = mutated_bytes(seed)
    codes = set()

    @FUZZ
    @given(strategy)
    def run(request):
        codes.add(call(channels[service], service, method, request, fake_registration(link)))
        assert_healthy(channels)

    run()
    assert codes, "no request was sent"
    assert_healthy(channels)


# --- bounds: one past each field's limit --------------------------------------------------------
def past_bounds(seed, prefix=""):
    """(path, request, what the refusal says after the path) for each string, repeated and bounded
    integer field of ``seed`` (and of the messages set in it): a copy of ``seed`` holding one more
    character, entry or unit than ``swapmoe.rpc.bounds`` allows."""
    from swapmoe.rpc.bounds import FIELD_LIMITS, FIELD_MAXIMA

    for field in seed.DESCRIPTOR.fields:
        if field.type == F.TYPE_MESSAGE and not field.is_repeated:
            if seed.HasField(field.name):
                for path, inner, detail in past_bounds(getattr(seed, field.name), f"{prefix}{field.name}."):
                    msg = type(seed)()
                    msg.CopyFrom(seed)
                    getattr(msg, field.name).CopyFrom(inner)
                    yield path, msg, detail
            continue
        if field.full_name in FIELD_MAXIMA:
            msg = type(seed)()
            msg.CopyFrom(seed)
            setattr(msg, field.name, FIELD_MAXIMA[field.full_name] + 1)
            yield f"{prefix}{field.name}", msg, f"{FIELD_MAXIMA[field.full_name] + 1} is outside"
            continue
        if field.type != F.TYPE_STRING and not field.is_repeated:
            continue
        limit = FIELD_LIMITS[field.full_name]
        count, chars = limit if isinstance(limit, tuple) else (limit, limit)
        msg = type(seed)()
        msg.CopyFrom(seed)
        value = getattr(msg, field.name)
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value.update({f"k{i}": "v" for i in range(count + 1)})
        elif field.type == F.TYPE_MESSAGE:
            value.extend([field.message_type._concrete_class()] * (count + 1 - len(value)))
        elif field.is_repeated:
            value.extend(["x" if field.type == F.TYPE_STRING else 1] * (count + 1 - len(value)))
        else:
            setattr(msg, field.name, "x" * (chars + 1))
        yield f"{prefix}{field.name}", msg, "has "


@pytest.mark.parametrize("service, method", [(s, m.name) for s, (d, _) in SERVICES.items() for m in d.methods])
def test_one_past_any_bound_is_invalid_argument_naming_the_field(services, service, method):
    engine, link, channels = services
    seed = seeds(engine, link)[method]
    checked = []
    for path, request, detail in past_bounds(seed):
        spec = SERVICES[service][0].methods_by_name[method]
        rpc = getattr(SERVICES[service][1](channels[service]), method)
        try:
            if spec.client_streaming:
                list(rpc(iter([request]), timeout=10))
            elif spec.server_streaming:
                list(rpc(request, timeout=10))
            else:
                rpc(request, timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
            assert error.details().startswith(f"{path}: {detail}"), (path, error.details())
            checked.append(path)
            continue
        raise AssertionError(f"{service}.{method} accepted {path} past its bound")
    assert checked or not seed.ListFields() or method in ("Describe", "ListRollouts")
    assert_healthy(channels)
