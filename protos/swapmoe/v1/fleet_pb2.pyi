from swapmoe.v1 import common_pb2 as _common_pb2
from swapmoe.v1 import planner_pb2 as _planner_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutNodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_NODE_STATE_UNSPECIFIED: _ClassVar[RolloutNodeState]
    ROLLOUT_NODE_STATE_WAITING: _ClassVar[RolloutNodeState]
    ROLLOUT_NODE_STATE_PENDING: _ClassVar[RolloutNodeState]
    ROLLOUT_NODE_STATE_ACKED: _ClassVar[RolloutNodeState]
    ROLLOUT_NODE_STATE_NACKED: _ClassVar[RolloutNodeState]
    ROLLOUT_NODE_STATE_UNREACHABLE: _ClassVar[RolloutNodeState]
    ROLLOUT_NODE_STATE_ROLLED_BACK: _ClassVar[RolloutNodeState]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_IN_PROGRESS: _ClassVar[RolloutState]
    ROLLOUT_STATE_SUCCEEDED: _ClassVar[RolloutState]
    ROLLOUT_STATE_FAILED: _ClassVar[RolloutState]
    ROLLOUT_STATE_PAUSED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ABORTED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLING_BACK: _ClassVar[RolloutState]
ROLLOUT_NODE_STATE_UNSPECIFIED: RolloutNodeState
ROLLOUT_NODE_STATE_WAITING: RolloutNodeState
ROLLOUT_NODE_STATE_PENDING: RolloutNodeState
ROLLOUT_NODE_STATE_ACKED: RolloutNodeState
ROLLOUT_NODE_STATE_NACKED: RolloutNodeState
ROLLOUT_NODE_STATE_UNREACHABLE: RolloutNodeState
ROLLOUT_NODE_STATE_ROLLED_BACK: RolloutNodeState
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_IN_PROGRESS: RolloutState
ROLLOUT_STATE_SUCCEEDED: RolloutState
ROLLOUT_STATE_FAILED: RolloutState
ROLLOUT_STATE_PAUSED: RolloutState
ROLLOUT_STATE_ABORTED: RolloutState
ROLLOUT_STATE_ROLLING_BACK: RolloutState

class ListNodesRequest(_message.Message):
    __slots__ = ("selector", "page_size", "page_token", "view", "connected_only")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_ONLY_FIELD_NUMBER: _ClassVar[int]
    selector: str
    page_size: int
    page_token: str
    view: _planner_pb2.StatusView
    connected_only: bool
    def __init__(self, selector: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[_planner_pb2.StatusView, str]] = ..., connected_only: _Optional[bool] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "next_page_token", "summary", "unreachable_planners")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_PLANNERS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[FleetNode]
    next_page_token: str
    summary: _planner_pb2.StatusSummary
    unreachable_planners: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nodes: _Optional[_Iterable[_Union[FleetNode, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., summary: _Optional[_Union[_planner_pb2.StatusSummary, _Mapping]] = ..., unreachable_planners: _Optional[_Iterable[str]] = ...) -> None: ...

class FleetNode(_message.Message):
    __slots__ = ("planner", "status", "rollout_state", "wave")
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STATE_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    planner: str
    status: _planner_pb2.ExecutorStatus
    rollout_state: RolloutNodeState
    wave: int
    def __init__(self, planner: _Optional[str] = ..., status: _Optional[_Union[_planner_pb2.ExecutorStatus, _Mapping]] = ..., rollout_state: _Optional[_Union[RolloutNodeState, str]] = ..., wave: _Optional[int] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("node_ids", "plan", "timeout_ms", "selector", "budget_bytes", "canary_nodes", "wave_percents", "max_failure_share", "bake_ms", "description")
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CANARY_NODES_FIELD_NUMBER: _ClassVar[int]
    WAVE_PERCENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURE_SHARE_FIELD_NUMBER: _ClassVar[int]
    BAKE_MS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    plan: _common_pb2.Plan
    timeout_ms: int
    selector: str
    budget_bytes: int
    canary_nodes: int
    wave_percents: _containers.RepeatedScalarFieldContainer[int]
    max_failure_share: float
    bake_ms: int
    description: str
    def __init__(self, node_ids: _Optional[_Iterable[str]] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., timeout_ms: _Optional[int] = ..., selector: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., canary_nodes: _Optional[int] = ..., wave_percents: _Optional[_Iterable[int]] = ..., max_failure_share: _Optional[float] = ..., bake_ms: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class GetRolloutRequest(_message.Message):
    __slots__ = ("rollout_id", "page_size", "page_token", "summary_only")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_ONLY_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    page_size: int
    page_token: str
    summary_only: bool
    def __init__(self, rollout_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., summary_only: _Optional[bool] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("rollout_id", "state", "nodes", "acked", "nacked", "pending", "started_ns", "unreachable", "waiting", "rolled_back", "targeted", "wave", "waves", "message", "updated_ns", "request", "next_page_token")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    NACKED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    STARTED_NS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    TARGETED_FIELD_NUMBER: _ClassVar[int]
    WAVE_FIELD_NUMBER: _ClassVar[int]
    WAVES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_NS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    state: RolloutState
    nodes: _containers.RepeatedCompositeFieldContainer[FleetNode]
    acked: int
    nacked: int
    pending: int
    started_ns: int
    unreachable: int
    waiting: int
    rolled_back: int
    targeted: int
    wave: int
    waves: int
    message: str
    updated_ns: int
    request: StartRolloutRequest
    next_page_token: str
    def __init__(self, rollout_id: _Optional[str] = ..., state: _Optional[_Union[RolloutState, str]] = ..., nodes: _Optional[_Iterable[_Union[FleetNode, _Mapping]]] = ..., acked: _Optional[int] = ..., nacked: _Optional[int] = ..., pending: _Optional[int] = ..., started_ns: _Optional[int] = ..., unreachable: _Optional[int] = ..., waiting: _Optional[int] = ..., rolled_back: _Optional[int] = ..., targeted: _Optional[int] = ..., wave: _Optional[int] = ..., waves: _Optional[int] = ..., message: _Optional[str] = ..., updated_ns: _Optional[int] = ..., request: _Optional[_Union[StartRolloutRequest, _Mapping]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListRolloutsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...

class RolloutActionRequest(_message.Message):
    __slots__ = ("rollout_id", "reason", "rollback")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    reason: str
    rollback: bool
    def __init__(self, rollout_id: _Optional[str] = ..., reason: _Optional[str] = ..., rollback: _Optional[bool] = ...) -> None: ...
