"""What one device measured for one model (paper section 3.3 and appendix A): the input of
E_latency and of the update-frequency choice (section 3.4.1).

Plain data: the executor measures it (``swapmoe.executor.device_profiling``), ``swapmoe.rpc.convert``
moves it over the wire, ``swapmoe.profiler`` stores it and fits models to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from swapmoe.core.layout import DeviceInfo, ModelLayout


@dataclass(frozen=True, slots=True)
class ComputeSample:
    """One expert's forward over ``tokens`` tokens (median)."""

    tokens: int
    expert_forward_ns: int


@dataclass(frozen=True, slots=True)
class LayerProfile:
    """One MoE layer: experts of a layer are alike, so one expert is measured per layer."""

    bytes_per_expert: int  # parameters
    activation_bytes_per_token: int  # one expert's intermediate activations for one token
    compute: tuple[ComputeSample, ...]


@dataclass(frozen=True, slots=True)
class LoadSample:
    """Reading one expert from a tier the executor loads from (median)."""

    tier: str
    expert_load_ns: int
    bytes_per_second: float


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """Generation at one update frequency (0: never update), at the sweep's plan."""

    update_frequency: int
    inter_token_ns: int  # median time between streamed tokens
    tokens_per_second: float
    loads_per_token: float


@dataclass(frozen=True, slots=True)
class BatchDecodePoint:
    """One decode pass of ``rows`` sequences at the sweep's plan, without updates: what a step
    costs at each batch size the executor's budget allows."""

    rows: int
    step_ns: int


@dataclass(frozen=True, slots=True)
class ThreadPoint:
    """One decode pass of one sequence at the sweep's plan, without updates, run by ``threads`` torch
    intra-op threads while an expert load runs beside it: what the forward pass's thread count costs
    or saves once loads share the cores."""

    threads: int
    step_ns: int


@dataclass(frozen=True, slots=True)
class PrecisionPoint:
    """One decode pass of one sequence at the sweep's residency, without updates, with every layer's
    experts at ``precision`` ("": the checkpoint's): what the kernels of each precision cost or save."""

    precision: str
    step_ns: int


@dataclass(frozen=True, slots=True)
class OnDemandPoint:
    """Generation with on-demand loading at the sweep's plan: every miss loaded before the pass
    goes on, so (inter_token_ns - the sweep's no-update time) / misses_per_token is what a
    synchronous miss costs on this device."""

    inter_token_ns: int
    misses_per_token: float


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    node_id: str
    device: DeviceInfo
    model_fingerprint: str  # swapmoe.core.fingerprint.model_fingerprint of the served checkpoint
    layout: ModelLayout
    layers: tuple[LayerProfile, ...]
    loads: tuple[LoadSample, ...]
    dense_forward_ns: int  # one decode step's time outside the experts
    decode_step_ns: int  # one decode step at the sweep's plan, without updates
    sweep_experts_per_layer: tuple[int, ...]  # the plan the sweep ran
    sweep: tuple[SweepPoint, ...]
    inflection_update_frequency: int  # the most frequent updates that do not cost latency
    on_demand: OnDemandPoint | None = None  # None: not measured (an older profile)
    batch_decode: tuple[BatchDecodePoint, ...] = ()  # by rows; empty: not measured (an older profile)
    thread_points: tuple[ThreadPoint, ...] = ()  # by threads; empty: not measured (an older profile)
    threads: int = 0  # the intra-op threads chosen from thread_points; 0: not measured
    precision_points: tuple[PrecisionPoint, ...] = ()  # "" first, then each lower one; empty: not measured
    sweep_precision: tuple[str, ...] = ()  # per layer, what the decode step and sweep ran at; empty: the checkpoint's

    def miss_ns(self) -> float | None:
        """What one synchronous (on-demand) miss costs, from the on-demand point; None when it
        was not measured or nothing missed."""
        baseline = next((p.inter_token_ns for p in self.sweep if p.update_frequency == 0), None)
        if self.on_demand is None or baseline is None or self.on_demand.misses_per_token <= 0:
            return None
        return max(0.0, (self.on_demand.inter_token_ns - baseline) / self.on_demand.misses_per_token)
