"""The contract: committed stubs match protos/, and messages survive the wire."""

import importlib.util
import re
from pathlib import Path

import pytest
from swapmoe.core.budget import Reserve
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import DeviceInfo, LayerLayout, ModelLayout
from swapmoe.core.memory import MemoryReport
from swapmoe.core.plan import Plan, PlanResult, Strategy
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, executor_pb2, fleet_pb2, planner_pb2, telemetry_pb2

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_not_stale(tmp_path):
    fresh = _generator().generate(tmp_path)
    assert fresh, "protoc produced nothing"
    committed = ROOT / "protos" / "swapmoe" / "v1"
    for path in fresh:
        current = committed / path.name
        assert current.exists(), f"{path.name} is not committed: run python protos/generate.py"
        assert current.read_text() == path.read_text(), f"{path.name} is stale: run python protos/generate.py"


DECLARATION = re.compile(r"^(message|service|rpc|enum|oneof) \w+|^(repeated |optional )?[\w.]+ \w+ = \d+;")


def undocumented(proto: Path) -> list[str]:
    """Declarations (messages, services, RPCs, enums, oneofs, fields) with no comment above them.

    Consecutive fields may share one comment, as in ``// Bytes in and out.`` over two lines.
    """
    lines = [line.strip() for line in proto.read_text().splitlines()]
    missing = []
    for number, line in enumerate(lines):
        if not DECLARATION.match(line) or line.endswith("{}") or "//" in line:
            continue
        above = number - 1
        while above >= 0 and DECLARATION.match(lines[above]) and lines[above].endswith(";"):
            above -= 1  # a group of fields under one comment
        if above < 0 or not lines[above].startswith("//"):
            missing.append(f"{proto.name}:{number + 1}: {line}")
    return missing


def test_every_message_and_field_is_documented():
    protos = sorted((ROOT / "protos" / "swapmoe" / "v1").glob("*.proto"))
    assert len(protos) == 5
    assert [m for p in protos for m in undocumented(p)] == []


def test_services_live_in_a_versioned_package():
    assert executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name == "swapmoe.v1.ExecutorService"
    assert planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name == "swapmoe.v1.PlannerService"
    assert fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name == "swapmoe.v1.FleetService"
    rpcs = {m.name for m in executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].methods}
    assert rpcs == {"Generate", "Subscribe", "ApplyPlan", "SetBudget", "Describe", "Profile"}


@pytest.mark.parametrize("strategy", list(Strategy))
def test_plan_round_trips_through_its_proto(strategy):
    plan = Plan(7, (3, 1, 8), update_frequency=16, strategy=strategy, origin="test", budget_bytes=1 << 30, rows=4)
    wire = common_pb2.Plan.FromString(convert.plan_to_pb(plan).SerializeToString())
    assert convert.plan_from_pb(wire) == plan


def test_unset_strategy_means_masked_gating_and_unknown_is_rejected():
    assert convert.plan_from_pb(common_pb2.Plan(version=1)).strategy is Strategy.MASKED_GATING
    with pytest.raises(InvalidField, match="plan.strategy"):
        convert.plan_from_pb(common_pb2.Plan(version=1, strategy=99))


def test_layout_device_and_memory_round_trip():
    layout = ModelLayout("mixtral", "MixtralForCausalLM",
                         (LayerLayout(0, "model.layers.0.mlp", 8, 2, 1000), LayerLayout(1, "model.layers.1.mlp", 16, 2, 500)),
                         dense_bytes=12345, dtype="bfloat16", vocab_size=259, max_positions=256)
    wire = common_pb2.ModelLayout.FromString(convert.layout_to_pb(layout).SerializeToString())
    assert convert.layout_from_pb(wire) == layout
    assert wire.total_bytes == 12345 + 8 * 1000 + 16 * 500
    device = DeviceInfo("cpu", "x86_64", 24 << 30, 2, "host")
    assert convert.device_from_pb(common_pb2.DeviceInfo.FromString(
        convert.device_to_pb(device).SerializeToString())) == device
    memory = MemoryReport(100, 10, 20, 30, 40, 500, 600)
    wire_memory = convert.memory_to_pb(memory)
    assert wire_memory.accounted_bytes == 100


def test_a_plan_without_rows_runs_as_many_as_the_budget_holds():
    assert convert.plan_from_pb(common_pb2.Plan(version=1, experts_per_layer=[2])).rows == 0


def test_plan_result_carries_ack_and_achieved_experts_and_rows():
    result = PlanResult(3, True, "", (2, 2), MemoryReport(10, 1, 2, 3, 4), apply_ns=99, achieved_rows=5)
    wire = common_pb2.PlanResult.FromString(convert.plan_result_to_pb(result).SerializeToString())
    assert (wire.plan_version, wire.accepted, list(wire.achieved_experts_per_layer), wire.apply_ns) == (3, True, [2, 2], 99)
    assert wire.memory.accounted_bytes == 10 and wire.achieved_rows == 5


def test_a_reserve_round_trips_with_its_bytes_per_sequence_and_an_older_executors_has_none():
    reserve = Reserve(staging_bytes=1, kv_cache_bytes=2, activation_bytes=3, batch_bytes=700, runtime_bytes=5,
                      sequence_bytes=100)
    wire = common_pb2.Reserve.FromString(convert.reserve_to_pb(reserve).SerializeToString())
    assert convert.reserve_from_pb(wire) == reserve and convert.reserve_from_pb(wire).max_rows == 8
    older = common_pb2.Reserve(staging_bytes=1, kv_cache_bytes=2, activation_bytes=3, batch_bytes=700, runtime_bytes=5)
    assert convert.reserve_from_pb(older).sequence_bytes == 0


def test_streaming_messages_round_trip():
    request = executor_pb2.GenerateRequest(token_ids=executor_pb2.TokenIds(ids=[1, 2, 3]), max_new_tokens=5,
                                           sampling=executor_pb2.SamplingParams(temperature=0.5, seed=0),
                                           stop=["\n\n"])
    back = executor_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids" and list(back.token_ids.ids) == [1, 2, 3]
    assert back.sampling.HasField("seed") and back.sampling.seed == 0  # seed 0 is distinct from unset
    event = telemetry_pb2.TelemetryEvent(node_id="n", sequence=4, dropped=2, event=telemetry_pb2.Event(
        kind=telemetry_pb2.Event.KIND_BUDGET_CHANGED, previous_budget_bytes=10, budget_bytes=5))
    back = telemetry_pb2.TelemetryEvent.FromString(event.SerializeToString())
    assert back.WhichOneof("payload") == "event" and back.event.budget_bytes == 5 and back.dropped == 2
    message = planner_pb2.ExecutorMessage(registration=planner_pb2.Registration(node_id="a", budget_bytes=1))
    assert planner_pb2.ExecutorMessage.FromString(message.SerializeToString()).registration.node_id == "a"
