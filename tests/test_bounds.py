"""Bounds on every string and repeated field a server receives (``swapmoe.rpc.bounds``): the table
covers every field of every request on purpose, and a server refuses a field past its bound with
INVALID_ARGUMENT naming it, before any handler runs or any record is written."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from swapmoe.core import limits
from swapmoe.core.errors import InvalidField
from swapmoe.rpc import bounds, transport
from swapmoe.rpc.auth import SERVICES
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc


def received_messages():
    """Every message type a server parses: each RPC's request and, on Connect, what an executor sends
    inside it, with the messages nested in them."""
    seen, todo = {}, [method.input_type for service in SERVICES for method in service.methods]
    while todo:
        descriptor = todo.pop()
        if descriptor.full_name in seen:
            continue
        seen[descriptor.full_name] = descriptor
        todo += [f.message_type for f in descriptor.fields if f.type == F.TYPE_MESSAGE]
    return seen.values()


def bounded_fields():
    return sorted(f.full_name for d in received_messages() for f in d.fields
                  if f.type == F.TYPE_STRING or f.is_repeated)


def test_every_string_and_repeated_field_a_server_receives_has_a_bound():
    missing = [name for name in bounded_fields() if name not in bounds.FIELD_LIMITS]
    assert not missing, f"add bounds for {missing} to swapmoe.rpc.bounds.FIELD_LIMITS"


def test_the_table_names_only_fields_that_exist():
    assert sorted(bounds.FIELD_LIMITS) == bounded_fields()


def test_a_string_past_its_bound_is_refused_by_its_path():
    message = ppb.ExecutorMessage(registration=ppb.Registration(node_id="n", model_fingerprint="0" * 65))
    with pytest.raises(InvalidField) as error:
        bounds.check_message(message)
    assert error.value.field == "registration.model_fingerprint"
    assert "65 characters; at most 64" in str(error.value)


def test_repeated_fields_maps_and_lists_of_strings_are_bounded_at_any_depth():
    too_many_layers = ppb.ExecutorMessage(profile_result=ppb.ProfileOutcome(result=epb.ProfileResult(
        layers=[epb.LayerProfile(compute=[epb.ComputeSample()] * (limits.MAX_PROFILE_SAMPLES + 1))])))
    with pytest.raises(InvalidField, match=r"profile_result\.result\.layers\[0\]\.compute: has 4097 entries"):
        bounds.check_message(too_many_layers)
    labels = ppb.Registration(labels={"model": "x" * 257})
    with pytest.raises(InvalidField, match=r"labels\['model'\]"):
        bounds.check_message(labels)
    stops = epb.GenerateRequest(stop=["x", "y" * (limits.MAX_STOP_CHARS + 1)])
    with pytest.raises(InvalidField, match=r"stop\[1\]"):
        bounds.check_message(stops)
    bounds.check_message(epb.GenerateRequest(text="fits", stop=["\n"], request_id="r"))


def test_a_server_refuses_an_oversized_field_before_its_handler_runs(tiny_engine):
    from swapmoe.executor.server import serve

    server = serve(tiny_engine)
    budget = tiny_engine.budget_bytes
    try:
        stub = executor_pb2_grpc.ExecutorServiceStub(transport.channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as error:
            stub.SetBudget(epb.SetBudgetRequest(budget_bytes=budget // 2, reason="r" * 5000), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("reason: has 5000 characters")
        assert tiny_engine.budget_bytes == budget  # the handler never ran
    finally:
        server.stop(0)


def test_the_planner_refuses_a_huge_fingerprint_on_the_stream_and_writes_no_record(tmp_path, tiny_engine):
    """An executor token's holder once sent a 50 MB fingerprint: it became a 150 MB state file."""
    from swapmoe.executor.planner_link import PlannerLink
    from swapmoe.planner_service.server import serve
    from swapmoe.planner_service.state import PlannerState

    planner, registry = serve(state_dir=tmp_path)
    try:
        registration = PlannerLink(tiny_engine, "unused").registration()
        registration.node_id, registration.model_fingerprint = "huge-fingerprint", "f" * (8 << 20)
        stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(f"127.0.0.1:{planner.port}"))
        stream = stub.Connect(iter([ppb.ExecutorMessage(registration=registration)]), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            next(stream)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("registration.model_fingerprint: has 8388608 characters")
        assert registry.find([]) == []
    finally:
        planner.stop(0)
    assert PlannerState(tmp_path).load() == []


def test_a_plan_in_a_request_is_bounded_like_the_rest():
    plan = common_pb2.Plan(experts_per_layer=[1] * (limits.MAX_LAYERS + 1))
    with pytest.raises(InvalidField, match=r"^plan\.experts_per_layer: has 1025 entries"):
        bounds.check_message(epb.ApplyPlanRequest(plan=plan))


def test_integer_maxima_name_integer_fields_that_exist():
    fields = {f.full_name: f for d in received_messages() for f in d.fields}
    for name in bounds.FIELD_MAXIMA:
        assert name in fields and fields[name].cpp_type in (F.CPPTYPE_UINT32, F.CPPTYPE_UINT64), name


@pytest.mark.parametrize("message, path, limit", [
    (lambda n: epb.ApplyPlanRequest(plan=common_pb2.Plan(rows=n)), "plan.rows", limits.MAX_ROWS),
    (lambda n: ppb.ExecutorMessage(plan_result=common_pb2.PlanResult(achieved_rows=n)), "plan_result.achieved_rows",
     limits.MAX_ROWS),
    (lambda n: ppb.ExecutorMessage(registration=ppb.Registration(reserve=common_pb2.Reserve(sequence_bytes=n))),
     "registration.reserve.sequence_bytes", limits.MAX_BYTES),
])
def test_rows_and_bytes_per_sequence_past_their_maxima_are_refused_by_their_path(message, path, limit):
    bounds.check_message(message(limit))
    with pytest.raises(InvalidField) as error:
        bounds.check_message(message(limit + 1))
    assert str(error.value) == f"{path}: {limit + 1} is outside the allowed range 0 to {limit}"


def test_a_status_page_ends_early_past_its_byte_limit_and_the_next_page_goes_on():
    """Executors choose their layouts: 500 of the largest the bounds allow would not fit one message,
    and `planner status` once failed with RESOURCE_EXHAUSTED for every viewer."""
    from swapmoe.planner_service.control import PlannerControl
    from swapmoe.planner_service.registration import check_registration
    from swapmoe.planner_service.registry import Registry
    from test_planner_registry import registration

    registry = Registry()
    for i in range(10):
        reg = registration(10**6)
        reg.node_id = f"n{i}"
        for layer in reg.layout.layers:
            layer.module = "m" * limits.MAX_LABEL_CHARS
        registry.connect(check_registration(reg))
    one = registry.statuses(registry.find(["n0"]))[0].ByteSize()
    control = PlannerControl(registry, max_page_bytes=3 * one + 1)
    seen, token = [], ""
    while True:
        page = control.plan_status(ppb.PlanStatusRequest(page_token=token))
        assert len(page.executors) <= 3 and page.summary.total == 10
        seen += [s.node_id for s in page.executors]
        if not (token := page.next_page_token):
            break
    assert seen == [f"n{i}" for i in range(10)]


@pytest.mark.parametrize("name", ["staging_bytes", "kv_cache_bytes", "activation_bytes", "batch_bytes",
                                  "runtime_bytes"])
def test_every_byte_count_of_a_registrations_reserve_is_bounded_by_name(name):
    from swapmoe.planner_service.registration import check_registration
    from test_planner_registry import registration

    reg = registration(10**6)
    setattr(reg.reserve, name, limits.MAX_BYTES + 1)
    with pytest.raises(InvalidField, match=rf"^registration\.reserve\.{name}: "):
        check_registration(reg)
