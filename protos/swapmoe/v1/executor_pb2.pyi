from swapmoe.v1 import common_pb2 as _common_pb2
from swapmoe.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT_FULL: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CONTEXT_FULL: FinishReason

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "max_new_tokens", "sampling", "stop", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    max_new_tokens: int
    sampling: SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "usage", "timings", "request_id")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    usage: _common_pb2.Usage
    timings: _common_pb2.Timings
    request_id: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("interval_ms", "topics")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    topics: _containers.RepeatedScalarFieldContainer[_telemetry_pb2.Topic]
    def __init__(self, interval_ms: _Optional[int] = ..., topics: _Optional[_Iterable[_Union[_telemetry_pb2.Topic, str]]] = ...) -> None: ...

class ApplyPlanRequest(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.Plan
    def __init__(self, plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("budget_bytes", "reason")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    reason: str
    def __init__(self, budget_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("previous_budget_bytes", "budget_bytes", "memory", "plan", "achieved_experts_per_layer")
    PREVIOUS_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    previous_budget_bytes: int
    budget_bytes: int
    memory: _common_pb2.MemoryReport
    plan: _common_pb2.Plan
    achieved_experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, previous_budget_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., memory: _Optional[_Union[_common_pb2.MemoryReport, _Mapping]] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., achieved_experts_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("node_id", "layout", "device", "budget_bytes", "min_budget_bytes", "plan", "achieved_experts_per_layer", "memory", "reserve", "state_error", "threads", "threads_reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    STATE_ERROR_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    THREADS_REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    layout: _common_pb2.ModelLayout
    device: _common_pb2.DeviceInfo
    budget_bytes: int
    min_budget_bytes: int
    plan: _common_pb2.Plan
    achieved_experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    memory: _common_pb2.MemoryReport
    reserve: _common_pb2.Reserve
    state_error: str
    threads: int
    threads_reason: str
    def __init__(self, node_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.ModelLayout, _Mapping]] = ..., device: _Optional[_Union[_common_pb2.DeviceInfo, _Mapping]] = ..., budget_bytes: _Optional[int] = ..., min_budget_bytes: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., achieved_experts_per_layer: _Optional[_Iterable[int]] = ..., memory: _Optional[_Union[_common_pb2.MemoryReport, _Mapping]] = ..., reserve: _Optional[_Union[_common_pb2.Reserve, _Mapping]] = ..., state_error: _Optional[str] = ..., threads: _Optional[int] = ..., threads_reason: _Optional[str] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("token_counts", "repeats", "update_frequencies", "sweep_tokens", "experts_per_layer")
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FREQUENCIES_FIELD_NUMBER: _ClassVar[int]
    SWEEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    repeats: int
    update_frequencies: _containers.RepeatedScalarFieldContainer[int]
    sweep_tokens: int
    experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_counts: _Optional[_Iterable[int]] = ..., repeats: _Optional[int] = ..., update_frequencies: _Optional[_Iterable[int]] = ..., sweep_tokens: _Optional[int] = ..., experts_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class ComputeSample(_message.Message):
    __slots__ = ("tokens", "expert_forward_ns")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    expert_forward_ns: int
    def __init__(self, tokens: _Optional[int] = ..., expert_forward_ns: _Optional[int] = ...) -> None: ...

class LayerProfile(_message.Message):
    __slots__ = ("bytes_per_expert", "activation_bytes_per_token", "compute")
    BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    bytes_per_expert: int
    activation_bytes_per_token: int
    compute: _containers.RepeatedCompositeFieldContainer[ComputeSample]
    def __init__(self, bytes_per_expert: _Optional[int] = ..., activation_bytes_per_token: _Optional[int] = ..., compute: _Optional[_Iterable[_Union[ComputeSample, _Mapping]]] = ...) -> None: ...

class LoadSample(_message.Message):
    __slots__ = ("tier", "expert_load_ns", "bytes_per_second")
    TIER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_NS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    tier: str
    expert_load_ns: int
    bytes_per_second: float
    def __init__(self, tier: _Optional[str] = ..., expert_load_ns: _Optional[int] = ..., bytes_per_second: _Optional[float] = ...) -> None: ...

class SweepPoint(_message.Message):
    __slots__ = ("update_frequency", "inter_token_ns", "tokens_per_second", "loads_per_token")
    UPDATE_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LOADS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    update_frequency: int
    inter_token_ns: int
    tokens_per_second: float
    loads_per_token: float
    def __init__(self, update_frequency: _Optional[int] = ..., inter_token_ns: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., loads_per_token: _Optional[float] = ...) -> None: ...

class ProfileResult(_message.Message):
    __slots__ = ("expert_load_ns", "load_bytes_per_second", "load_tier", "compute", "bytes_per_expert", "dense_bytes", "node_id", "device", "model_fingerprint", "layout", "layers", "loads", "dense_forward_ns", "decode_step_ns", "sweep_experts_per_layer", "sweep", "inflection_update_frequency", "on_demand", "batch_decode", "thread_points", "threads", "precision_points", "sweep_precision")
    EXPERT_LOAD_NS_FIELD_NUMBER: _ClassVar[int]
    LOAD_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIER_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_NS_FIELD_NUMBER: _ClassVar[int]
    SWEEP_EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    INFLECTION_UPDATE_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    BATCH_DECODE_FIELD_NUMBER: _ClassVar[int]
    THREAD_POINTS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_POINTS_FIELD_NUMBER: _ClassVar[int]
    SWEEP_PRECISION_FIELD_NUMBER: _ClassVar[int]
    expert_load_ns: int
    load_bytes_per_second: float
    load_tier: str
    compute: _containers.RepeatedCompositeFieldContainer[ComputeSample]
    bytes_per_expert: _containers.RepeatedScalarFieldContainer[int]
    dense_bytes: int
    node_id: str
    device: _common_pb2.DeviceInfo
    model_fingerprint: str
    layout: _common_pb2.ModelLayout
    layers: _containers.RepeatedCompositeFieldContainer[LayerProfile]
    loads: _containers.RepeatedCompositeFieldContainer[LoadSample]
    dense_forward_ns: int
    decode_step_ns: int
    sweep_experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    sweep: _containers.RepeatedCompositeFieldContainer[SweepPoint]
    inflection_update_frequency: int
    on_demand: OnDemandPoint
    batch_decode: _containers.RepeatedCompositeFieldContainer[BatchDecodePoint]
    thread_points: _containers.RepeatedCompositeFieldContainer[ThreadPoint]
    threads: int
    precision_points: _containers.RepeatedCompositeFieldContainer[PrecisionPoint]
    sweep_precision: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, expert_load_ns: _Optional[int] = ..., load_bytes_per_second: _Optional[float] = ..., load_tier: _Optional[str] = ..., compute: _Optional[_Iterable[_Union[ComputeSample, _Mapping]]] = ..., bytes_per_expert: _Optional[_Iterable[int]] = ..., dense_bytes: _Optional[int] = ..., node_id: _Optional[str] = ..., device: _Optional[_Union[_common_pb2.DeviceInfo, _Mapping]] = ..., model_fingerprint: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.ModelLayout, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerProfile, _Mapping]]] = ..., loads: _Optional[_Iterable[_Union[LoadSample, _Mapping]]] = ..., dense_forward_ns: _Optional[int] = ..., decode_step_ns: _Optional[int] = ..., sweep_experts_per_layer: _Optional[_Iterable[int]] = ..., sweep: _Optional[_Iterable[_Union[SweepPoint, _Mapping]]] = ..., inflection_update_frequency: _Optional[int] = ..., on_demand: _Optional[_Union[OnDemandPoint, _Mapping]] = ..., batch_decode: _Optional[_Iterable[_Union[BatchDecodePoint, _Mapping]]] = ..., thread_points: _Optional[_Iterable[_Union[ThreadPoint, _Mapping]]] = ..., threads: _Optional[int] = ..., precision_points: _Optional[_Iterable[_Union[PrecisionPoint, _Mapping]]] = ..., sweep_precision: _Optional[_Iterable[str]] = ...) -> None: ...

class PrecisionPoint(_message.Message):
    __slots__ = ("precision", "step_ns")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    precision: str
    step_ns: int
    def __init__(self, precision: _Optional[str] = ..., step_ns: _Optional[int] = ...) -> None: ...

class ThreadPoint(_message.Message):
    __slots__ = ("threads", "step_ns")
    THREADS_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    threads: int
    step_ns: int
    def __init__(self, threads: _Optional[int] = ..., step_ns: _Optional[int] = ...) -> None: ...

class BatchDecodePoint(_message.Message):
    __slots__ = ("rows", "step_ns")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    step_ns: int
    def __init__(self, rows: _Optional[int] = ..., step_ns: _Optional[int] = ...) -> None: ...

class OnDemandPoint(_message.Message):
    __slots__ = ("inter_token_ns", "misses_per_token")
    INTER_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    MISSES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    inter_token_ns: int
    misses_per_token: float
    def __init__(self, inter_token_ns: _Optional[int] = ..., misses_per_token: _Optional[float] = ...) -> None: ...

class ProfileProgress(_message.Message):
    __slots__ = ("fraction", "stage", "result")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    stage: str
    result: ProfileResult
    def __init__(self, fraction: _Optional[float] = ..., stage: _Optional[str] = ..., result: _Optional[_Union[ProfileResult, _Mapping]] = ...) -> None: ...
