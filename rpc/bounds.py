"""Every string and repeated field of every message a server receives, bounded before a handler runs.

``FIELD_LIMITS`` names each such field of each request (and of each message an executor sends
up its Connect stream) with the most it may hold: characters for a string, entries for a
repeated field or a map, both for a list of strings. One interceptor per server kind checks
each incoming message against it, streams message by message, so a 50 MB fingerprint or a
million node ids is an INVALID_ARGUMENT naming the field, never a copy into a state file, a
reason or a log line. The table is complete by construction: ``tests/test_bounds.py`` fails
for a field of a request that it does not list, so a new field gets its bound on purpose.
``FIELD_MAXIMA`` bounds integer fields the same way where a message carries them to code that
sizes work by them (a plan's rows, a reserve's bytes per sequence). Handlers still check what
bounds cannot say (other ranges, formats, meaning).
"""

from __future__ import annotations

import inspect
from typing import Callable

import grpc
from google.protobuf.descriptor import FieldDescriptor

from swapmoe.core import labels, limits
from swapmoe.rpc import convert

_OURS = "/swapmoe."  # health and reflection are grpc's own, with their own bounds
_PLAN_STATES = 8
_ROLLOUT_ID_CHARS = 64
_PAGE_TOKEN_CHARS = 4 * limits.MAX_NODE_ID_CHARS + 64
_LABEL = limits.MAX_LABEL_CHARS
_REASON = limits.MAX_REASON_CHARS
_NODE = limits.MAX_NODE_ID_CHARS
_NODE_IDS = (limits.MAX_NODES_PER_REQUEST, _NODE)
_SAMPLES = limits.MAX_PROFILE_SAMPLES
_PRECISIONS = 8  # a layer's lower precisions (executor.quantization offers three)

# Full field name -> characters (string), entries (repeated, map) or (entries, characters each).
FIELD_LIMITS: dict[str, int | tuple[int, int]] = {
    # common.proto
    "swapmoe.v1.LayerLayout.module": _LABEL,
    "swapmoe.v1.LayerLayout.precisions": _PRECISIONS,
    "swapmoe.v1.PrecisionBytes.precision": _LABEL,
    "swapmoe.v1.ModelLayout.architecture": _LABEL,
    "swapmoe.v1.ModelLayout.model_class": _LABEL,
    "swapmoe.v1.ModelLayout.layers": limits.MAX_LAYERS,
    "swapmoe.v1.ModelLayout.dtype": _LABEL,
    "swapmoe.v1.DeviceInfo.kind": _LABEL,
    "swapmoe.v1.DeviceInfo.name": _LABEL,
    "swapmoe.v1.DeviceInfo.hostname": _LABEL,
    "swapmoe.v1.Plan.experts_per_layer": limits.MAX_LAYERS,
    "swapmoe.v1.Plan.origin": _LABEL,
    "swapmoe.v1.Plan.precision": (limits.MAX_LAYERS, _LABEL),
    "swapmoe.v1.PlanResult.reason": _REASON,
    "swapmoe.v1.PlanResult.achieved_experts_per_layer": limits.MAX_LAYERS,
    # executor.proto
    "swapmoe.v1.TokenIds.ids": limits.MAX_TOKEN_IDS,
    "swapmoe.v1.GenerateRequest.text": limits.MAX_PROMPT_CHARS,
    "swapmoe.v1.GenerateRequest.stop": (limits.MAX_STOP_SEQUENCES, limits.MAX_STOP_CHARS),
    "swapmoe.v1.GenerateRequest.request_id": _LABEL,
    "swapmoe.v1.SubscribeRequest.topics": limits.MAX_TOPICS,
    "swapmoe.v1.SetBudgetRequest.reason": _REASON,
    "swapmoe.v1.ProfileRequest.token_counts": limits.MAX_PROFILE_TOKEN_COUNTS,
    "swapmoe.v1.ProfileRequest.update_frequencies": convert.MAX_PROFILE_UPDATE_FREQUENCIES,
    "swapmoe.v1.ProfileRequest.experts_per_layer": limits.MAX_LAYERS,
    "swapmoe.v1.ProfileResult.load_tier": _LABEL,
    "swapmoe.v1.ProfileResult.compute": _SAMPLES,
    "swapmoe.v1.ProfileResult.bytes_per_expert": limits.MAX_LAYERS,
    "swapmoe.v1.ProfileResult.node_id": _NODE,
    "swapmoe.v1.ProfileResult.model_fingerprint": limits.MAX_FINGERPRINT_CHARS,
    "swapmoe.v1.ProfileResult.layers": limits.MAX_LAYERS,
    "swapmoe.v1.ProfileResult.loads": _SAMPLES,
    "swapmoe.v1.ProfileResult.sweep_experts_per_layer": limits.MAX_LAYERS,
    "swapmoe.v1.ProfileResult.sweep": _SAMPLES,
    "swapmoe.v1.ProfileResult.batch_decode": _SAMPLES,
    "swapmoe.v1.ProfileResult.thread_points": _SAMPLES,
    "swapmoe.v1.ProfileResult.precision_points": _PRECISIONS + 1,
    "swapmoe.v1.ProfileResult.sweep_precision": (limits.MAX_LAYERS, _LABEL),
    "swapmoe.v1.PrecisionPoint.precision": _LABEL,
    "swapmoe.v1.LayerProfile.compute": _SAMPLES,
    "swapmoe.v1.LoadSample.tier": _LABEL,
    # telemetry.proto (executors send it up their Connect stream)
    "swapmoe.v1.TelemetryEvent.node_id": _NODE,
    "swapmoe.v1.ExpertReport.layers": limits.MAX_LAYERS,
    "swapmoe.v1.LayerExperts.activations": limits.MAX_EXPERTS_PER_LAYER,
    "swapmoe.v1.LayerExperts.importance": limits.MAX_EXPERTS_PER_LAYER,
    "swapmoe.v1.LayerExperts.resident": limits.MAX_EXPERTS_PER_LAYER,
    "swapmoe.v1.SwapReport.tier": _LABEL,
    "swapmoe.v1.PlanReport.achieved_experts_per_layer": limits.MAX_LAYERS,
    "swapmoe.v1.Event.message": _REASON,
    "swapmoe.v1.Event.request_id": _LABEL,
    # planner.proto
    "swapmoe.v1.Registration.node_id": _NODE,
    "swapmoe.v1.Registration.executor_address": limits.MAX_ADDRESS_CHARS,
    "swapmoe.v1.Registration.node_secret": limits.MAX_SECRET_CHARS,
    "swapmoe.v1.Registration.model_fingerprint": limits.MAX_FINGERPRINT_CHARS,
    "swapmoe.v1.Registration.labels": labels.MAX_LABELS,
    "swapmoe.v1.Registration.LabelsEntry.key": _NODE,
    "swapmoe.v1.Registration.LabelsEntry.value": labels.MAX_LABEL_VALUE_CHARS,
    "swapmoe.v1.BudgetChange.reason": _REASON,
    "swapmoe.v1.ProfileOutcome.request_id": _LABEL,
    "swapmoe.v1.ProfileOutcome.error": _REASON,
    "swapmoe.v1.PlanStatusRequest.node_ids": _NODE_IDS,
    "swapmoe.v1.PlanStatusRequest.selector": labels.MAX_SELECTOR_CHARS,
    "swapmoe.v1.PlanStatusRequest.page_token": _PAGE_TOKEN_CHARS,
    "swapmoe.v1.PlanStatusRequest.states": _PLAN_STATES,
    "swapmoe.v1.PushPlanRequest.node_ids": _NODE_IDS,
    "swapmoe.v1.PushPlanRequest.selector": labels.MAX_SELECTOR_CHARS,
    "swapmoe.v1.ProfileExecutorRequest.node_id": _NODE,
    "swapmoe.v1.ForgetNodesRequest.node_ids": _NODE_IDS,
    # fleet.proto
    "swapmoe.v1.ListNodesRequest.selector": labels.MAX_SELECTOR_CHARS,
    "swapmoe.v1.ListNodesRequest.page_token": _PAGE_TOKEN_CHARS,
    "swapmoe.v1.StartRolloutRequest.node_ids": _NODE_IDS,
    "swapmoe.v1.StartRolloutRequest.selector": labels.MAX_SELECTOR_CHARS,
    "swapmoe.v1.StartRolloutRequest.wave_percents": 100,
    "swapmoe.v1.StartRolloutRequest.description": _REASON,
    "swapmoe.v1.GetRolloutRequest.rollout_id": _ROLLOUT_ID_CHARS,
    "swapmoe.v1.GetRolloutRequest.page_token": _PAGE_TOKEN_CHARS,
    "swapmoe.v1.RolloutActionRequest.rollout_id": _ROLLOUT_ID_CHARS,
    "swapmoe.v1.RolloutActionRequest.reason": _REASON,
}
# Full field name -> the largest value an integer field may hold (the least is 0).
FIELD_MAXIMA: dict[str, int] = {
    "swapmoe.v1.Plan.rows": limits.MAX_ROWS,
    "swapmoe.v1.PlanResult.achieved_rows": limits.MAX_ROWS,
    "swapmoe.v1.Reserve.sequence_bytes": limits.MAX_BYTES,
}
_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def check_message(message, path: str = "") -> None:
    """Raise InvalidField, naming the field by its path (``registration.labels``), for the first set
    field of ``message`` (nested messages included) that holds more than ``FIELD_LIMITS`` or
    ``FIELD_MAXIMA`` allows."""
    for field, value in message.ListFields():
        name = path + field.name
        if field.is_repeated:
            limit = FIELD_LIMITS[field.full_name]
            limits.check_count(name, value, limit[0] if isinstance(limit, tuple) else limit)
            if field.type == _STRING:
                for i, item in enumerate(value):
                    limits.check_text(f"{name}[{i}]", item, limit[1])
            elif field.type == _MESSAGE and field.message_type.GetOptions().map_entry:
                _check_map(field, value, name)
            elif field.type == _MESSAGE:
                for i, item in enumerate(value):
                    check_message(item, f"{name}[{i}].")
        elif field.type == _STRING:
            limits.check_text(name, value, FIELD_LIMITS[field.full_name])
        elif field.type == _MESSAGE:
            check_message(value, name + ".")
        elif field.full_name in FIELD_MAXIMA:
            limits.check_range(name, value, 0, FIELD_MAXIMA[field.full_name])


def _check_map(field, entries, name: str) -> None:
    key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
    for k, v in entries.items():
        if key.type == _STRING:
            limits.check_text(f"{name} key", k, FIELD_LIMITS[key.full_name])
        if value.type == _STRING:
            limits.check_text(f"{name}[{k[:40]!r}]", v, FIELD_LIMITS[value.full_name])


def _checked_iterator(requests):
    for request in requests:
        check_message(request)
        yield request


async def _checked_async_iterator(requests):
    async for request in requests:
        check_message(request)
        yield request


def _checked(fn: Callable, streaming_request: bool, streaming_response: bool) -> Callable:
    """``fn`` (a sync or grpc.aio behavior) that checks its request, or each request of a stream,
    first; of the same kind as ``fn`` (function, generator, coroutine or async generator), so the
    error interceptors around it turn an InvalidField into INVALID_ARGUMENT."""
    def requests(request, asynchronous: bool):
        if not streaming_request:
            check_message(request)
            return request
        return _checked_async_iterator(request) if asynchronous else _checked_iterator(request)

    if inspect.isasyncgenfunction(fn):
        async def behavior(request, context):
            async for item in fn(requests(request, True), context):
                yield item
    elif inspect.iscoroutinefunction(fn):
        async def behavior(request, context):
            return await fn(requests(request, True), context)
    elif streaming_response:
        def behavior(request, context):
            yield from fn(requests(request, False), context)
    else:
        def behavior(request, context):
            return fn(requests(request, False), context)
    return behavior


def _bounded(handler, method: str):
    if handler is None or not method.startswith(_OURS):
        return handler
    for kind, streaming_request, streaming_response in (("unary_unary", False, False), ("unary_stream", False, True),
                                                        ("stream_unary", True, False), ("stream_stream", True, True)):
        fn = getattr(handler, kind)
        if fn is not None:
            return handler._replace(**{kind: _checked(fn, streaming_request, streaming_response)})
    return handler


class BoundsInterceptor(grpc.ServerInterceptor):
    """Checks every request of our services against ``FIELD_LIMITS``; place it inside the error
    interceptor, so its InvalidField becomes INVALID_ARGUMENT naming the field."""

    def intercept_service(self, continuation, handler_call_details):
        return _bounded(continuation(handler_call_details), handler_call_details.method)


class AioBoundsInterceptor(grpc.aio.ServerInterceptor):
    """``BoundsInterceptor`` for grpc.aio servers."""

    async def intercept_service(self, continuation, handler_call_details):
        return _bounded(await continuation(handler_call_details), handler_call_details.method)
