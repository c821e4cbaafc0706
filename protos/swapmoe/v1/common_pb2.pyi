from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NonResidentStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_RESIDENT_STRATEGY_UNSPECIFIED: _ClassVar[NonResidentStrategy]
    NON_RESIDENT_STRATEGY_MASKED_GATING: _ClassVar[NonResidentStrategy]
    NON_RESIDENT_STRATEGY_SKIP: _ClassVar[NonResidentStrategy]
    NON_RESIDENT_STRATEGY_ON_DEMAND: _ClassVar[NonResidentStrategy]
NON_RESIDENT_STRATEGY_UNSPECIFIED: NonResidentStrategy
NON_RESIDENT_STRATEGY_MASKED_GATING: NonResidentStrategy
NON_RESIDENT_STRATEGY_SKIP: NonResidentStrategy
NON_RESIDENT_STRATEGY_ON_DEMAND: NonResidentStrategy

class LayerLayout(_message.Message):
    __slots__ = ("index", "module", "num_experts", "top_k", "bytes_per_expert", "precisions")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    index: int
    module: str
    num_experts: int
    top_k: int
    bytes_per_expert: int
    precisions: _containers.RepeatedCompositeFieldContainer[PrecisionBytes]
    def __init__(self, index: _Optional[int] = ..., module: _Optional[str] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., bytes_per_expert: _Optional[int] = ..., precisions: _Optional[_Iterable[_Union[PrecisionBytes, _Mapping]]] = ...) -> None: ...

class PrecisionBytes(_message.Message):
    __slots__ = ("precision", "bytes_per_expert")
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    precision: str
    bytes_per_expert: int
    def __init__(self, precision: _Optional[str] = ..., bytes_per_expert: _Optional[int] = ...) -> None: ...

class ModelLayout(_message.Message):
    __slots__ = ("architecture", "model_class", "layers", "dense_bytes", "total_bytes", "dtype", "vocab_size", "max_positions", "encoder_decoder")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_CLASS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_DECODER_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    model_class: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerLayout]
    dense_bytes: int
    total_bytes: int
    dtype: str
    vocab_size: int
    max_positions: int
    encoder_decoder: bool
    def __init__(self, architecture: _Optional[str] = ..., model_class: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerLayout, _Mapping]]] = ..., dense_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_positions: _Optional[int] = ..., encoder_decoder: _Optional[bool] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("kind", "name", "memory_bytes", "cpu_count", "hostname")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    memory_bytes: int
    cpu_count: int
    hostname: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., cpu_count: _Optional[int] = ..., hostname: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("version", "experts_per_layer", "update_frequency", "strategy", "origin", "budget_bytes", "rows", "precision")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    version: int
    experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    update_frequency: int
    strategy: NonResidentStrategy
    origin: str
    budget_bytes: int
    rows: int
    precision: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., experts_per_layer: _Optional[_Iterable[int]] = ..., update_frequency: _Optional[int] = ..., strategy: _Optional[_Union[NonResidentStrategy, str]] = ..., origin: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., rows: _Optional[int] = ..., precision: _Optional[_Iterable[str]] = ...) -> None: ...

class PlanResult(_message.Message):
    __slots__ = ("plan_version", "accepted", "reason", "achieved_experts_per_layer", "memory", "apply_ns", "achieved_rows")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_EXPERTS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    APPLY_NS_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_ROWS_FIELD_NUMBER: _ClassVar[int]
    plan_version: int
    accepted: bool
    reason: str
    achieved_experts_per_layer: _containers.RepeatedScalarFieldContainer[int]
    memory: MemoryReport
    apply_ns: int
    achieved_rows: int
    def __init__(self, plan_version: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., achieved_experts_per_layer: _Optional[_Iterable[int]] = ..., memory: _Optional[_Union[MemoryReport, _Mapping]] = ..., apply_ns: _Optional[int] = ..., achieved_rows: _Optional[int] = ...) -> None: ...

class Reserve(_message.Message):
    __slots__ = ("staging_bytes", "kv_cache_bytes", "activation_bytes", "batch_bytes", "runtime_bytes", "sequence_bytes")
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    staging_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    batch_bytes: int
    runtime_bytes: int
    sequence_bytes: int
    def __init__(self, staging_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., activation_bytes: _Optional[int] = ..., batch_bytes: _Optional[int] = ..., runtime_bytes: _Optional[int] = ..., sequence_bytes: _Optional[int] = ...) -> None: ...

class MemoryReport(_message.Message):
    __slots__ = ("budget_bytes", "accounted_bytes", "dense_bytes", "expert_bytes", "kv_cache_bytes", "activation_bytes", "process_rss_bytes", "process_peak_rss_bytes", "runtime_bytes")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    accounted_bytes: int
    dense_bytes: int
    expert_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    process_rss_bytes: int
    process_peak_rss_bytes: int
    runtime_bytes: int
    def __init__(self, budget_bytes: _Optional[int] = ..., accounted_bytes: _Optional[int] = ..., dense_bytes: _Optional[int] = ..., expert_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., activation_bytes: _Optional[int] = ..., process_rss_bytes: _Optional[int] = ..., process_peak_rss_bytes: _Optional[int] = ..., runtime_bytes: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ns", "time_to_first_token_ns", "mean_inter_token_ns", "total_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    MEAN_INTER_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    time_to_first_token_ns: int
    mean_inter_token_ns: int
    total_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., time_to_first_token_ns: _Optional[int] = ..., mean_inter_token_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...
