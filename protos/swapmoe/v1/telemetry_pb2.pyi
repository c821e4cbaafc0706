from swapmoe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Topic(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOPIC_UNSPECIFIED: _ClassVar[Topic]
    TOPIC_MEMORY: _ClassVar[Topic]
    TOPIC_THROUGHPUT: _ClassVar[Topic]
    TOPIC_EXPERTS: _ClassVar[Topic]
    TOPIC_SWAPS: _ClassVar[Topic]
    TOPIC_PLAN: _ClassVar[Topic]
    TOPIC_EVENTS: _ClassVar[Topic]
TOPIC_UNSPECIFIED: Topic
TOPIC_MEMORY: Topic
TOPIC_THROUGHPUT: Topic
TOPIC_EXPERTS: Topic
TOPIC_SWAPS: Topic
TOPIC_PLAN: Topic
TOPIC_EVENTS: Topic

class ThroughputReport(_message.Message):
    __slots__ = ("tokens_per_second", "tokens_total", "requests_total", "queue_depth", "time_to_first_token_p50_ns", "inter_token_p50_ns", "inter_token_p99_ns", "running")
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_P50_NS_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_P50_NS_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_P99_NS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    tokens_per_second: float
    tokens_total: int
    requests_total: int
    queue_depth: int
    time_to_first_token_p50_ns: int
    inter_token_p50_ns: int
    inter_token_p99_ns: int
    running: int
    def __init__(self, tokens_per_second: _Optional[float] = ..., tokens_total: _Optional[int] = ..., requests_total: _Optional[int] = ..., queue_depth: _Optional[int] = ..., time_to_first_token_p50_ns: _Optional[int] = ..., inter_token_p50_ns: _Optional[int] = ..., inter_token_p99_ns: _Optional[int] = ..., running: _Optional[int] = ...) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "activations", "importance", "resident")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    activations: _containers.RepeatedScalarFieldContainer[int]
    importance: _containers.RepeatedScalarFieldContainer[float]
    resident: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., activations: _Optional[_Iterable[int]] = ..., importance: _Optional[_Iterable[float]] = ..., resident: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertReport(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ...) -> None: ...

class SwapReport(_message.Message):
    __slots__ = ("experts_loaded", "bytes_loaded", "load_ns", "experts_loaded_total", "tier")
    EXPERTS_LOADED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_NS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_LOADED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    experts_loaded: int
    bytes_loaded: int
    load_ns: int
    experts_loaded_total: int
    tier: str
    def __init__(self, experts_loaded: _Optional[int] = ..., bytes_loaded: _Optional[int] = ..., load_ns: _Optional[int] = ..., experts_loaded_total: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class PlanReport(_message.Message):
    __slots__ = ("plan", "achieved_experts_per_layer")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    plan: _common_pb2.Plan
    achieved_experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., achieved_experts_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "message", "previous_budget_bytes", "budget_bytes", "plan_version", "request_id")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Event.Kind]
        KIND_STARTED: _ClassVar[Event.Kind]
        KIND_BUDGET_CHANGED: _ClassVar[Event.Kind]
        KIND_PLAN_APPLIED: _ClassVar[Event.Kind]
        KIND_PLAN_REJECTED: _ClassVar[Event.Kind]
        KIND_REQUEST_FINISHED: _ClassVar[Event.Kind]
        KIND_SHUTTING_DOWN: _ClassVar[Event.Kind]
    KIND_UNSPECIFIED: Event.Kind
    KIND_STARTED: Event.Kind
    KIND_BUDGET_CHANGED: Event.Kind
    KIND_PLAN_APPLIED: Event.Kind
    KIND_PLAN_REJECTED: Event.Kind
    KIND_REQUEST_FINISHED: Event.Kind
    KIND_SHUTTING_DOWN: Event.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kind: Event.Kind
    message: str
    previous_budget_bytes: int
    budget_bytes: int
    plan_version: int
    request_id: str
    def __init__(self, kind: _Optional[_Union[Event.Kind, str]] = ..., message: _Optional[str] = ..., previous_budget_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., plan_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class TelemetryEvent(_message.Message):
    __slots__ = ("node_id", "sequence", "timestamp_ns", "dropped", "memory", "throughput", "experts", "swaps", "plan", "event")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    sequence: int
    timestamp_ns: int
    dropped: int
    memory: _common_pb2.MemoryReport
    throughput: ThroughputReport
    experts: ExpertReport
    swaps: SwapReport
    plan: PlanReport
    event: Event
    def __init__(self, node_id: _Optional[str] = ..., sequence: _Optional[int] = ..., timestamp_ns: _Optional[int] = ..., dropped: _Optional[int] = ..., memory: _Optional[_Union[_common_pb2.MemoryReport, _Mapping]] = ..., throughput: _Optional[_Union[ThroughputReport, _Mapping]] = ..., experts: _Optional[_Union[ExpertReport, _Mapping]] = ..., swaps: _Optional[_Union[SwapReport, _Mapping]] = ..., plan: _Optional[_Union[PlanReport, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...
