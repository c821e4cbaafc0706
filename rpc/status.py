"""Exceptions to gRPC statuses: one interceptor for every SwapMoE server.

``InvalidField`` and other ``ValueError``s become INVALID_ARGUMENT with a message naming the
field, ``Busy`` RESOURCE_EXHAUSTED, ``NotFound`` NOT_FOUND, ``Forbidden`` PERMISSION_DENIED,
``Corrupted`` DATA_LOSS, ``Conflict``
FAILED_PRECONDITION, a failed upstream call its own status; anything else is INTERNAL and
logged with its traceback.

An ``InvalidField`` also carries the richer error model of google.rpc (AIP-193): a
``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer holding a ``BadRequest`` whose
field violation names the field, so a client reads which field failed with
``grpc_status.rpc_status.from_call(error)`` instead of parsing the message, which stays as before.
"""

from __future__ import annotations

import logging
from typing import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from swapmoe.core.errors import Busy, Conflict, Corrupted, Forbidden, InvalidField, NotFound, Unauthenticated

log = logging.getLogger(__name__)

_STATUS = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (Corrupted, grpc.StatusCode.DATA_LOSS),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
)


class Abort(Exception):
    """Ends a call with exactly this status, for outcomes the error types above do not name
    (a deadline the server enforces, an executor's relayed failure)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(error: Exception) -> grpc.StatusCode:
    if isinstance(error, Abort):
        return error.code
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return error.code()  # an upstream call failed: pass its status on
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions escaping a handler to gRPC statuses, for unary and streaming responses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_guard_unary(handler.stream_unary, method))
        return handler._replace(stream_stream=_guard_stream(handler.stream_stream, method))


def describe(error: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple]:
    """The status, message and trailing metadata (the rich status: ``rich_details``) a handler's
    exception ends its call with; INTERNAL ones are logged with their traceback (the caller sees
    only the message). grpc.aio's ``context.abort`` takes the three as they are."""
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=error)
    if isinstance(error, grpc.RpcError) and hasattr(error, "details"):
        message = f"upstream call failed: {error.code().name}: {error.details()}"
    else:
        message = str(error) or type(error).__name__
    return code, message, rich_details(error, code, message)


def rich_details(error: Exception, code: grpc.StatusCode, message: str) -> tuple:
    """The trailer with a ``google.rpc.Status`` for ``error``: a ``BadRequest`` naming the field of an
    ``InvalidField``, or the details an upstream call failed with; empty for other errors."""
    if isinstance(error, InvalidField):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.detail)
        details = [_packed(error_details_pb2.BadRequest(field_violations=[violation]))]
    elif isinstance(error, grpc.RpcError) and hasattr(error, "trailing_metadata"):  # sync or aio
        try:
            upstream = rpc_status.from_call(error)
        except ValueError:  # a trailer that does not match its call: pass nothing on
            upstream = None
        details = list(upstream.details) if upstream is not None else []
    else:
        details = []
    if not details:
        return ()
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return tuple(rpc_status.to_status(status).trailing_metadata)


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _abort(context: grpc.ServicerContext, error: Exception, method: str):
    code, message, trailing_metadata = describe(error, method)
    if trailing_metadata:
        context.set_trailing_metadata(trailing_metadata)
    context.abort(code, message)


def _guard_unary(fn: Callable, method: str) -> Callable:
    def guarded(request, context):
        try:
            return fn(request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            if context.code() is not None:
                raise  # the handler already set a status (context.abort)
            _abort(context, error, method)

    return guarded


def _guard_stream(fn: Callable, method: str) -> Callable:
    def guarded(request, context):
        try:
            yield from fn(request, context)
        except Exception as error:  # noqa: BLE001
            if context.code() is not None:
                raise
            _abort(context, error, method)

    return guarded
