"""The one place where core types (``swapmoe.core``) meet their protos (``swapmoe.v1``)."""

from __future__ import annotations

from swapmoe.core import limits
from swapmoe.core.budget import Reserve
from swapmoe.core.device_profile import (BatchDecodePoint, ComputeSample, DeviceProfile, LayerProfile, LoadSample,
                                         OnDemandPoint, PrecisionPoint, SweepPoint, ThreadPoint)
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import DeviceInfo, LayerLayout, ModelLayout
from swapmoe.core.memory import MemoryReport
from swapmoe.core.plan import BudgetChange, Plan, PlanResult, Strategy
from swapmoe.v1 import common_pb2 as pb, executor_pb2 as epb, planner_pb2 as ppb

# ProfileRequest bounds beside those in swapmoe.core.limits: a sweep of at most 16 update
# frequencies of at most 4,096 tokens each (the executor also keeps tokens within its context).
MAX_PROFILE_UPDATE_FREQUENCIES = 16
MAX_PROFILE_SWEEP_TOKENS = 4096
MAX_PROFILE_TOKENS = 1 << 20  # a compute sample's tokens, on a device whose context is not known

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
        budget_bytes=plan.budget_bytes,
        rows=plan.rows,
        precision=list(plan.precision),
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
        budget_bytes=msg.budget_bytes,
        rows=msg.rows,
        precision=tuple(msg.precision),
    )


def layout_to_pb(layout: ModelLayout) -> pb.ModelLayout:
    return pb.ModelLayout(
        architecture=layout.architecture,
        model_class=layout.model_class,
        layers=[
            pb.LayerLayout(index=l.index, module=l.module, num_experts=l.num_experts,
                           top_k=l.top_k, bytes_per_expert=l.bytes_per_expert,
                           precisions=[pb.PrecisionBytes(precision=p, bytes_per_expert=b) for p, b in l.precisions])
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
            LayerLayout(l.index, l.module, l.num_experts, l.top_k, l.bytes_per_expert,
                        tuple((p.precision, p.bytes_per_expert) for p in l.precisions)) for l in msg.layers
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
        runtime_bytes=report.runtime_bytes,
    )


def plan_result_to_pb(result: PlanResult) -> pb.PlanResult:
    msg = pb.PlanResult(
        plan_version=result.plan_version,
        accepted=result.accepted,
        reason=result.reason,
        achieved_experts_per_layer=list(result.achieved_experts_per_layer),
        apply_ns=result.apply_ns,
        achieved_rows=result.achieved_rows,
    )
    if result.memory is not None:
        msg.memory.CopyFrom(memory_to_pb(result.memory))
    return msg


def budget_change_to_pb(change: BudgetChange) -> ppb.BudgetChange:
    return ppb.BudgetChange(previous_budget_bytes=change.previous_bytes, budget_bytes=change.budget_bytes,
                            reason=change.reason)


def budget_change_from_pb(msg: ppb.BudgetChange) -> BudgetChange:
    return BudgetChange(msg.previous_budget_bytes, msg.budget_bytes, msg.reason)


def reserve_to_pb(reserve: Reserve) -> pb.Reserve:
    return pb.Reserve(staging_bytes=reserve.staging_bytes, kv_cache_bytes=reserve.kv_cache_bytes,
                      activation_bytes=reserve.activation_bytes, batch_bytes=reserve.batch_bytes,
                      runtime_bytes=reserve.runtime_bytes, sequence_bytes=reserve.sequence_bytes)


def reserve_from_pb(msg: pb.Reserve) -> Reserve:
    return Reserve(msg.staging_bytes, msg.kv_cache_bytes, msg.activation_bytes, msg.batch_bytes, msg.runtime_bytes,
                   msg.sequence_bytes)


def check_profile_request(msg: epb.ProfileRequest, max_tokens: int = MAX_PROFILE_TOKENS,
                          max_sweep_tokens: int = MAX_PROFILE_SWEEP_TOKENS, prefix: str = "") -> None:
    """Bounds of every ProfileRequest field, before any work. The executor passes its context
    (``max_tokens``) and the room its sweep prompt leaves in it (``max_sweep_tokens``); the
    planner relaying a request checks the bounds that hold on every device."""
    limits.check_count(f"{prefix}token_counts", msg.token_counts, limits.MAX_PROFILE_TOKEN_COUNTS)
    for i, tokens in enumerate(msg.token_counts):
        limits.check_range(f"{prefix}token_counts[{i}]", tokens, 1, max_tokens)
    limits.check_range(f"{prefix}repeats", msg.repeats, 0, limits.MAX_PROFILE_REPEATS)
    limits.check_count(f"{prefix}update_frequencies", msg.update_frequencies, MAX_PROFILE_UPDATE_FREQUENCIES)
    for i, frequency in enumerate(msg.update_frequencies):
        limits.check_range(f"{prefix}update_frequencies[{i}]", frequency, 0, limits.MAX_UPDATE_FREQUENCY)
    if msg.sweep_tokens:  # two tokens at least: one time between them
        limits.check_range(f"{prefix}sweep_tokens", msg.sweep_tokens, 2, min(max_sweep_tokens, MAX_PROFILE_SWEEP_TOKENS))
    limits.check_count(f"{prefix}experts_per_layer", msg.experts_per_layer, limits.MAX_LAYERS)
    for i, kept in enumerate(msg.experts_per_layer):
        limits.check_range(f"{prefix}experts_per_layer[{i}]", kept, 1, limits.MAX_EXPERTS_PER_LAYER)


def _compute_to_pb(samples) -> list[epb.ComputeSample]:
    return [epb.ComputeSample(tokens=c.tokens, expert_forward_ns=c.expert_forward_ns) for c in samples]


def device_profile_to_pb(profile: DeviceProfile) -> epb.ProfileResult:
    """The whole profile, plus the fields older readers know (first load tier, first layer)."""
    first_load = profile.loads[0] if profile.loads else LoadSample("", 0, 0.0)
    return epb.ProfileResult(
        expert_load_ns=first_load.expert_load_ns,
        load_bytes_per_second=first_load.bytes_per_second,
        load_tier=first_load.tier,
        compute=_compute_to_pb(profile.layers[0].compute if profile.layers else ()),
        bytes_per_expert=[l.bytes_per_expert for l in profile.layers],
        dense_bytes=profile.layout.dense_bytes,
        node_id=profile.node_id,
        device=device_to_pb(profile.device),
        model_fingerprint=profile.model_fingerprint,
        layout=layout_to_pb(profile.layout),
        layers=[epb.LayerProfile(bytes_per_expert=l.bytes_per_expert,
                                 activation_bytes_per_token=l.activation_bytes_per_token,
                                 compute=_compute_to_pb(l.compute)) for l in profile.layers],
        loads=[epb.LoadSample(tier=l.tier, expert_load_ns=l.expert_load_ns, bytes_per_second=l.bytes_per_second)
               for l in profile.loads],
        dense_forward_ns=profile.dense_forward_ns,
        decode_step_ns=profile.decode_step_ns,
        sweep_experts_per_layer=list(profile.sweep_experts_per_layer),
        sweep=[epb.SweepPoint(update_frequency=p.update_frequency, inter_token_ns=p.inter_token_ns,
                              tokens_per_second=p.tokens_per_second, loads_per_token=p.loads_per_token)
               for p in profile.sweep],
        inflection_update_frequency=profile.inflection_update_frequency,
        on_demand=epb.OnDemandPoint(inter_token_ns=profile.on_demand.inter_token_ns,
                                    misses_per_token=profile.on_demand.misses_per_token) if profile.on_demand else None,
        batch_decode=[epb.BatchDecodePoint(rows=b.rows, step_ns=b.step_ns) for b in profile.batch_decode],
        thread_points=[epb.ThreadPoint(threads=t.threads, step_ns=t.step_ns) for t in profile.thread_points],
        threads=profile.threads,
        precision_points=[epb.PrecisionPoint(precision=p.precision, step_ns=p.step_ns) for p in profile.precision_points],
        sweep_precision=list(profile.sweep_precision),
    )


def device_profile_from_pb(msg: epb.ProfileResult) -> DeviceProfile:
    return DeviceProfile(
        node_id=msg.node_id,
        device=device_from_pb(msg.device),
        model_fingerprint=msg.model_fingerprint,
        layout=layout_from_pb(msg.layout),
        layers=tuple(LayerProfile(l.bytes_per_expert, l.activation_bytes_per_token,
                                  tuple(ComputeSample(c.tokens, c.expert_forward_ns) for c in l.compute))
                     for l in msg.layers),
        loads=tuple(LoadSample(l.tier, l.expert_load_ns, l.bytes_per_second) for l in msg.loads),
        dense_forward_ns=msg.dense_forward_ns,
        decode_step_ns=msg.decode_step_ns,
        sweep_experts_per_layer=tuple(msg.sweep_experts_per_layer),
        sweep=tuple(SweepPoint(p.update_frequency, p.inter_token_ns, p.tokens_per_second, p.loads_per_token)
                    for p in msg.sweep),
        inflection_update_frequency=msg.inflection_update_frequency,
        on_demand=OnDemandPoint(msg.on_demand.inter_token_ns, msg.on_demand.misses_per_token)
        if msg.HasField("on_demand") else None,
        batch_decode=tuple(BatchDecodePoint(b.rows, b.step_ns) for b in msg.batch_decode),
        thread_points=tuple(ThreadPoint(t.threads, t.step_ns) for t in msg.thread_points),
        threads=msg.threads,
        precision_points=tuple(PrecisionPoint(p.precision, p.step_ns) for p in msg.precision_points),
        sweep_precision=tuple(msg.sweep_precision),
    )
