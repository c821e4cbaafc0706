"""The one place where core types (``swapmoe.core``) meet their protos (``swapmoe.v1``)."""

from __future__ import annotations

from swapmoe.core.budget import Reserve
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import DeviceInfo, LayerLayout, ModelLayout
from swapmoe.core.memory import MemoryReport
from swapmoe.core.plan import Plan, PlanResult, Strategy
from swapmoe.v1 import common_pb2 as pb

_STRATEGY_TO_PB = {
    Strategy.MASKED_GATING: pb.NON_RESIDENT_STRATEGY_MASKED_GATING,
    Strategy.SKIP: pb.NON_RESIDENT_STRATEGY_SKIP,
    Strategy.ON_DEMAND: pb.NON_RESIDENT_STRATEGY_ON_DEMAND,
}
_STRATEGY_FROM_PB = {v: k for k, v in _STRATEGY_TO_PB.items()}
_STRATEGY_FROM_PB[pb.NON_RESIDENT_STRATEGY_UNSPECIFIED] = Strategy.MASKED_GATING


def plan_to_pb(plan: Plan) -> pb.Plan:
    return pb.Plan(
        version=plan.version,
        experts_per_layer=list(plan.experts_per_layer),
        update_frequency=plan.update_frequency,
        strategy=_STRATEGY_TO_PB[plan.strategy],
        origin=plan.origin,
    )


def plan_from_pb(msg: pb.Plan) -> Plan:
    if msg.strategy not in _STRATEGY_FROM_PB:
        raise InvalidField("plan.strategy", f"unknown strategy value {msg.strategy}")
    return Plan(
        version=msg.version,
        experts_per_layer=tuple(msg.experts_per_layer),
        update_frequency=msg.update_frequency,
        strategy=_STRATEGY_FROM_PB[msg.strategy],
        origin=msg.origin,
    )


def layout_to_pb(layout: ModelLayout) -> pb.ModelLayout:
    return pb.ModelLayout(
        architecture=layout.architecture,
        model_class=layout.model_class,
        layers=[
            pb.LayerLayout(index=l.index, module=l.module, num_experts=l.num_experts,
                           top_k=l.top_k, bytes_per_expert=l.bytes_per_expert)
            for l in layout.layers
        ],
        dense_bytes=layout.dense_bytes,
        total_bytes=layout.total_bytes,
        dtype=layout.dtype,
        vocab_size=layout.vocab_size,
        max_positions=layout.max_positions,
        encoder_decoder=layout.encoder_decoder,
    )


def layout_from_pb(msg: pb.ModelLayout) -> ModelLayout:
    return ModelLayout(
        architecture=msg.architecture,
        model_class=msg.model_class,
        layers=tuple(
            LayerLayout(l.index, l.module, l.num_experts, l.top_k, l.bytes_per_expert) for l in msg.layers
        ),
        dense_bytes=msg.dense_bytes,
        dtype=msg.dtype,
        vocab_size=msg.vocab_size,
        max_positions=msg.max_positions,
        encoder_decoder=msg.encoder_decoder,
    )


def device_to_pb(device: DeviceInfo) -> pb.DeviceInfo:
    return pb.DeviceInfo(kind=device.kind, name=device.name, memory_bytes=device.memory_bytes,
                         cpu_count=device.cpu_count, hostname=device.hostname)


def device_from_pb(msg: pb.DeviceInfo) -> DeviceInfo:
    return DeviceInfo(msg.kind, msg.name, msg.memory_bytes, msg.cpu_count, msg.hostname)


def memory_to_pb(report: MemoryReport) -> pb.MemoryReport:
    return pb.MemoryReport(
        budget_bytes=report.budget_bytes,
        accounted_bytes=report.accounted_bytes,
        dense_bytes=report.dense_bytes,
        expert_bytes=report.expert_bytes,
        kv_cache_bytes=report.kv_cache_bytes,
        activation_bytes=report.activation_bytes,
        process_rss_bytes=report.process_rss_bytes,
        process_peak_rss_bytes=report.process_peak_rss_bytes,
    )


def plan_result_to_pb(result: PlanResult) -> pb.PlanResult:
    msg = pb.PlanResult(
        plan_version=result.plan_version,
        accepted=result.accepted,
        reason=result.reason,
        achieved_experts_per_layer=list(result.achieved_experts_per_layer),
        apply_ns=result.apply_ns,
    )
    if result.memory is not None:
        msg.memory.CopyFrom(memory_to_pb(result.memory))
    return msg


def memory_from_pb(msg: pb.MemoryReport) -> MemoryReport:
    return MemoryReport(msg.budget_bytes, msg.dense_bytes, msg.expert_bytes, msg.kv_cache_bytes,
                        msg.activation_bytes, msg.process_rss_bytes, msg.process_peak_rss_bytes)


def reserve_to_pb(reserve: Reserve) -> pb.Reserve:
    return pb.Reserve(staging_bytes=reserve.staging_bytes, kv_cache_bytes=reserve.kv_cache_bytes,
                      activation_bytes=reserve.activation_bytes)


def reserve_from_pb(msg: pb.Reserve) -> Reserve:
    return Reserve(msg.staging_bytes, msg.kv_cache_bytes, msg.activation_bytes)
