from swapmoe.v1 import common_pb2 as _common_pb2
from swapmoe.v1 import executor_pb2 as _executor_pb2
from swapmoe.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_STATE_UNSPECIFIED: _ClassVar[PlanState]
    PLAN_STATE_PENDING: _ClassVar[PlanState]
    PLAN_STATE_ACKED: _ClassVar[PlanState]
    PLAN_STATE_NACKED: _ClassVar[PlanState]

class StatusView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_VIEW_FULL: _ClassVar[StatusView]
    STATUS_VIEW_BRIEF: _ClassVar[StatusView]
PLAN_STATE_UNSPECIFIED: PlanState
PLAN_STATE_PENDING: PlanState
PLAN_STATE_ACKED: PlanState
PLAN_STATE_NACKED: PlanState
STATUS_VIEW_FULL: StatusView
STATUS_VIEW_BRIEF: StatusView

class Registration(_message.Message):
    __slots__ = ("node_id", "device", "budget_bytes", "min_budget_bytes", "layout", "current_plan", "executor_address", "reserve", "node_secret", "model_fingerprint", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PLAN_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device: _common_pb2.DeviceInfo
    budget_bytes: int
    min_budget_bytes: int
    layout: _common_pb2.ModelLayout
    current_plan: _common_pb2.Plan
    executor_address: str
    reserve: _common_pb2.Reserve
    node_secret: str
    model_fingerprint: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, node_id: _Optional[str] = ..., device: _Optional[_Union[_common_pb2.DeviceInfo, _Mapping]] = ..., budget_bytes: _Optional[int] = ..., min_budget_bytes: _Optional[int] = ..., layout: _Optional[_Union[_common_pb2.ModelLayout, _Mapping]] = ..., current_plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., executor_address: _Optional[str] = ..., reserve: _Optional[_Union[_common_pb2.Reserve, _Mapping]] = ..., node_secret: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BudgetChange(_message.Message):
    __slots__ = ("previous_budget_bytes", "budget_bytes", "reason")
    PREVIOUS_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    previous_budget_bytes: int
    budget_bytes: int
    reason: str
    def __init__(self, previous_budget_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ExecutorMessage(_message.Message):
    __slots__ = ("registration", "telemetry", "budget_change", "plan_result", "profile_result")
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_CHANGE_FIELD_NUMBER: _ClassVar[int]
    PLAN_RESULT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_RESULT_FIELD_NUMBER: _ClassVar[int]
    registration: Registration
    telemetry: _telemetry_pb2.TelemetryEvent
    budget_change: BudgetChange
    plan_result: _common_pb2.PlanResult
    profile_result: ProfileOutcome
    def __init__(self, registration: _Optional[_Union[Registration, _Mapping]] = ..., telemetry: _Optional[_Union[_telemetry_pb2.TelemetryEvent, _Mapping]] = ..., budget_change: _Optional[_Union[BudgetChange, _Mapping]] = ..., plan_result: _Optional[_Union[_common_pb2.PlanResult, _Mapping]] = ..., profile_result: _Optional[_Union[ProfileOutcome, _Mapping]] = ...) -> None: ...

class ProfileOutcome(_message.Message):
    __slots__ = ("request_id", "result", "error", "error_code")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: _executor_pb2.ProfileResult
    error: str
    error_code: int
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[_executor_pb2.ProfileResult, _Mapping]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("telemetry_interval_ms", "topics", "node_secret")
    TELEMETRY_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    telemetry_interval_ms: int
    topics: _containers.RepeatedScalarFieldContainer[_telemetry_pb2.Topic]
    node_secret: str
    def __init__(self, telemetry_interval_ms: _Optional[int] = ..., topics: _Optional[_Iterable[_Union[_telemetry_pb2.Topic, str]]] = ..., node_secret: _Optional[str] = ...) -> None: ...

class PlannerMessage(_message.Message):
    __slots__ = ("welcome", "plan", "profile_request", "cancel_profile")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PROFILE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CANCEL_PROFILE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    plan: _common_pb2.Plan
    profile_request: ProfileAsk
    cancel_profile: str
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., profile_request: _Optional[_Union[ProfileAsk, _Mapping]] = ..., cancel_profile: _Optional[str] = ...) -> None: ...

class ProfileAsk(_message.Message):
    __slots__ = ("request_id", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request: _executor_pb2.ProfileRequest
    def __init__(self, request_id: _Optional[str] = ..., request: _Optional[_Union[_executor_pb2.ProfileRequest, _Mapping]] = ...) -> None: ...

class ExecutorStatus(_message.Message):
    __slots__ = ("node_id", "connected", "budget_bytes", "layout", "device", "desired_plan", "acked_plan", "state", "last_result", "memory", "last_seen_ns", "pinned", "workload", "reason", "predicted", "throughput", "profile_state", "labels", "executor_address")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_PLAN_FIELD_NUMBER: _ClassVar[int]
    ACKED_PLAN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_NS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    connected: bool
    budget_bytes: int
    layout: _common_pb2.ModelLayout
    device: _common_pb2.DeviceInfo
    desired_plan: _common_pb2.Plan
    acked_plan: _common_pb2.Plan
    state: PlanState
    last_result: _common_pb2.PlanResult
    memory: _common_pb2.MemoryReport
    last_seen_ns: int
    pinned: bool
    workload: str
    reason: str
    predicted: PlanPrediction
    throughput: _telemetry_pb2.ThroughputReport
    profile_state: str
    labels: _containers.ScalarMap[str, str]
    executor_address: str
    def __init__(self, node_id: _Optional[str] = ..., connected: _Optional[bool] = ..., budget_bytes: _Optional[int] = ..., layout: _Optional[_Union[_common_pb2.ModelLayout, _Mapping]] = ..., device: _Optional[_Union[_common_pb2.DeviceInfo, _Mapping]] = ..., desired_plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., acked_plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., state: _Optional[_Union[PlanState, str]] = ..., last_result: _Optional[_Union[_common_pb2.PlanResult, _Mapping]] = ..., memory: _Optional[_Union[_common_pb2.MemoryReport, _Mapping]] = ..., last_seen_ns: _Optional[int] = ..., pinned: _Optional[bool] = ..., workload: _Optional[str] = ..., reason: _Optional[str] = ..., predicted: _Optional[_Union[PlanPrediction, _Mapping]] = ..., throughput: _Optional[_Union[_telemetry_pb2.ThroughputReport, _Mapping]] = ..., profile_state: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., executor_address: _Optional[str] = ...) -> None: ...

class StatusSummary(_message.Message):
    __slots__ = ("total", "connected", "pending", "acked", "nacked", "unplanned", "pinned")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    NACKED_FIELD_NUMBER: _ClassVar[int]
    UNPLANNED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    total: int
    connected: int
    pending: int
    acked: int
    nacked: int
    unplanned: int
    pinned: int
    def __init__(self, total: _Optional[int] = ..., connected: _Optional[int] = ..., pending: _Optional[int] = ..., acked: _Optional[int] = ..., nacked: _Optional[int] = ..., unplanned: _Optional[int] = ..., pinned: _Optional[int] = ...) -> None: ...

class PlanPrediction(_message.Message):
    __slots__ = ("workload", "accuracy", "accuracy_metric", "inter_token_ns", "tokens_per_second", "memory_bytes", "budget_bytes", "offered_load", "throughput")
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_METRIC_FIELD_NUMBER: _ClassVar[int]
    INTER_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFERED_LOAD_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    workload: str
    accuracy: float
    accuracy_metric: str
    inter_token_ns: int
    tokens_per_second: float
    memory_bytes: int
    budget_bytes: int
    offered_load: int
    throughput: float
    def __init__(self, workload: _Optional[str] = ..., accuracy: _Optional[float] = ..., accuracy_metric: _Optional[str] = ..., inter_token_ns: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., offered_load: _Optional[int] = ..., throughput: _Optional[float] = ...) -> None: ...

class PlanStatusRequest(_message.Message):
    __slots__ = ("node_ids", "selector", "page_size", "page_token", "view", "connected_only", "states")
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_ONLY_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    selector: str
    page_size: int
    page_token: str
    view: StatusView
    connected_only: bool
    states: _containers.RepeatedScalarFieldContainer[PlanState]
    def __init__(self, node_ids: _Optional[_Iterable[str]] = ..., selector: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[StatusView, str]] = ..., connected_only: _Optional[bool] = ..., states: _Optional[_Iterable[_Union[PlanState, str]]] = ...) -> None: ...

class PlanStatusResponse(_message.Message):
    __slots__ = ("executors", "next_page_token", "summary", "unsaved_records", "state_error")
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    UNSAVED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    STATE_ERROR_FIELD_NUMBER: _ClassVar[int]
    executors: _containers.RepeatedCompositeFieldContainer[ExecutorStatus]
    next_page_token: str
    summary: StatusSummary
    unsaved_records: int
    state_error: str
    def __init__(self, executors: _Optional[_Iterable[_Union[ExecutorStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., summary: _Optional[_Union[StatusSummary, _Mapping]] = ..., unsaved_records: _Optional[int] = ..., state_error: _Optional[str] = ...) -> None: ...

class PushPlanRequest(_message.Message):
    __slots__ = ("node_ids", "plan", "selector", "budget_bytes", "view")
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    plan: _common_pb2.Plan
    selector: str
    budget_bytes: int
    view: StatusView
    def __init__(self, node_ids: _Optional[_Iterable[str]] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., selector: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., view: _Optional[_Union[StatusView, str]] = ...) -> None: ...

class PushPlanResponse(_message.Message):
    __slots__ = ("executors",)
    EXECUTORS_FIELD_NUMBER: _ClassVar[int]
    executors: _containers.RepeatedCompositeFieldContainer[ExecutorStatus]
    def __init__(self, executors: _Optional[_Iterable[_Union[ExecutorStatus, _Mapping]]] = ...) -> None: ...

class ProfileExecutorRequest(_message.Message):
    __slots__ = ("node_id", "request", "timeout_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    request: _executor_pb2.ProfileRequest
    timeout_s: int
    def __init__(self, node_id: _Optional[str] = ..., request: _Optional[_Union[_executor_pb2.ProfileRequest, _Mapping]] = ..., timeout_s: _Optional[int] = ...) -> None: ...

class ProfileExecutorResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _executor_pb2.ProfileResult
    def __init__(self, result: _Optional[_Union[_executor_pb2.ProfileResult, _Mapping]] = ...) -> None: ...

class ForgetNodesRequest(_message.Message):
    __slots__ = ("node_ids",)
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ForgetNodesResponse(_message.Message):
    __slots__ = ("forgotten",)
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    forgotten: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, forgotten: _Optional[_Iterable[str]] = ...) -> None: ...
