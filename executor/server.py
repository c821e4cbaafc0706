"""ExecutorService over gRPC: thin translators between protos and the engine."""

from __future__ import annotations

import contextlib
import time

import grpc

from swapmoe.core import limits
from swapmoe.core.errors import InvalidField
from swapmoe.executor.scheduler import Cancelled
from swapmoe.executor.engine import Engine
from swapmoe.executor.generation import GenerationRequest, SamplingParams
from swapmoe.executor.profiling import ProfileProgress, ProfileSpec
from swapmoe.executor.request_log import RequestRecord, new_request_id, report_request
from swapmoe.executor.telemetry import TelemetryReporter
from swapmoe.executor.text import Chunk
from swapmoe.rpc import convert, transport
from swapmoe.rpc.security import ServerSecurity
from swapmoe.rpc.status import status_for
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, telemetry_pb2 as tpb

SERVICE_NAME = epb.DESCRIPTOR.services_by_name["ExecutorService"].full_name
DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS_LIMIT = 4096
_FINISH = {
    "length": epb.FINISH_REASON_LENGTH,
    "stop": epb.FINISH_REASON_STOP,
    "eos": epb.FINISH_REASON_EOS,
    "context_full": epb.FINISH_REASON_CONTEXT_FULL,
}


def request_from_pb(msg: epb.GenerateRequest, engine: Engine) -> GenerationRequest:
    """Every field is bounded before the prompt is tokenized or the request queued."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidField("prompt", "is missing: set text or token_ids")
    if kind == "text" and not msg.text.strip():
        raise InvalidField("prompt.text", "is empty")
    limits.check_text("prompt.text", msg.text, limits.MAX_PROMPT_CHARS)
    limits.check_count("prompt.token_ids.ids", msg.token_ids.ids, engine.max_context)
    limits.check_count("stop", msg.stop, limits.MAX_STOP_SEQUENCES)
    for i, stop in enumerate(msg.stop):
        limits.check_text(f"stop[{i}]", stop, limits.MAX_STOP_CHARS)
    limits.check_text("request_id", msg.request_id)
    if not msg.request_id.isprintable():  # it goes into log lines: no forged ones
        raise InvalidField("request_id", "has non-printable characters")
    if msg.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InvalidField("max_new_tokens", f"{msg.max_new_tokens} is above the limit of {MAX_NEW_TOKENS_LIMIT}")
    s = msg.sampling
    sampling = SamplingParams(s.temperature, s.top_p or 1.0, s.top_k, s.seed if s.HasField("seed") else None)
    ids = engine.tokenize(msg.text) if kind == "text" else tuple(msg.token_ids.ids)
    if not ids:
        raise InvalidField(f"prompt.{kind}", "is empty")
    return GenerationRequest(ids, msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, sampling, tuple(msg.stop))


def chunk_to_pb(chunk: Chunk, request_id: str = "") -> epb.GenerateResponse:
    msg = epb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text, request_id=request_id)
    if chunk.finish_reason:
        msg.finish_reason = _FINISH[chunk.finish_reason]
        msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=chunk.prompt_tokens,
                                            completion_tokens=chunk.completion_tokens))
        msg.timings.CopyFrom(common_pb2.Timings(**chunk.timings))
    return msg


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    def Generate(self, request, context):
        # A client that cancels or passes its deadline stops the work: while queued, between
        # tokens, and by closing the stream. However the call ends, it leaves one request line.
        record = RequestRecord(_loggable(request.request_id) or new_request_id())
        try:
            generation = request_from_pb(request, self.engine)
            record.prompt_tokens = len(generation.prompt_ids)
            chunks = self.engine.generate(generation, cancelled=lambda: not context.is_active())
            with contextlib.closing(chunks):
                for n, chunk in enumerate(chunks):
                    record.chunk(chunk)
                    yield chunk_to_pb(chunk, record.request_id if n == 0 or chunk.finish_reason else "")
        except Cancelled:
            pass
        except Exception as error:  # the interceptor turns it into the call's status
            record.end(status_for(error).name, str(error) or type(error).__name__)
            raise
        finally:  # also when the stream is closed under it (GeneratorExit: its client went away)
            if not record.code:
                record.end("OK" if record.finish_reason else _gone(context).name)
            report_request(record, self.engine.stats, self.engine.hub)

    def Subscribe(self, request, context):
        if request.interval_ms:
            limits.check_range("interval_ms", request.interval_ms, 10, limits.MAX_SUBSCRIBE_INTERVAL_MS)
        limits.check_count("topics", request.topics, len(tpb.Topic.values()))
        unknown = [t for t in request.topics if t not in tpb.Topic.values() or t == tpb.TOPIC_UNSPECIFIED]
        if unknown:
            raise InvalidField("topics", f"unknown topic values {unknown}")
        interval = (request.interval_ms or 1000) / 1000
        hub = self.engine.hub
        subscription = hub.subscribe(request.topics)
        context.add_callback(lambda: hub.unsubscribe(subscription))
        reporter = TelemetryReporter(self.engine)
        due = time.monotonic()
        try:
            while context.is_active() and not subscription.closed:
                if time.monotonic() >= due:
                    due += interval
                    for report in reporter.reports(subscription.topics - {tpb.TOPIC_EVENTS}):
                        yield subscription.stamp(report)
                event = subscription.next(timeout=max(0.0, due - time.monotonic()))
                if event is not None:
                    yield event
        finally:
            hub.unsubscribe(subscription)

    def ApplyPlan(self, request, context):
        if not request.HasField("plan"):
            raise InvalidField("plan", "is missing")
        result = self.engine.apply_plan(convert.plan_from_pb(request.plan))
        return convert.plan_result_to_pb(result)

    def SetBudget(self, request, context):
        limits.check_text("reason", request.reason, limits.MAX_REASON_CHARS)
        previous = self.engine.set_budget(request.budget_bytes, request.reason)
        return epb.SetBudgetResponse(
            previous_budget_bytes=previous,
            budget_bytes=self.engine.budget_bytes,
            memory=convert.memory_to_pb(self.engine.memory()),
            plan=convert.plan_to_pb(self.engine.plan),
            achieved_experts_per_layer=self.engine.achieved,
        )

    def Describe(self, request, context):
        return describe_pb(self.engine)

    def Profile(self, request, context):
        # Takes its turn in the generation queue, and stops between measurements when the client leaves.
        progress = self.engine.profile(profile_spec_from_pb(request, self.engine),
                                       cancelled=lambda: not context.is_active())
        with contextlib.closing(progress):
            try:
                for step in progress:
                    yield progress_to_pb(step)
            except Cancelled:
                return


def _loggable(request_id: str) -> str:
    """The id as the request line gives it, even for a request refused for its id: at most the
    id's length limit, control characters escaped."""
    request_id = request_id[:limits.MAX_LABEL_CHARS]
    return request_id if request_id.isprintable() else ascii(request_id)


def _gone(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why a call ended with no answer from us: its deadline passed, or its client cancelled it."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def profile_spec_from_pb(msg: epb.ProfileRequest, engine: Engine) -> ProfileSpec:
    """Every field is bounded (tokens within the context) before the request is queued."""
    convert.check_profile_request(msg, engine.max_context, engine.sweep_room)
    default = ProfileSpec()
    return ProfileSpec(
        token_counts=tuple(msg.token_counts) or default.token_counts,
        repeats=msg.repeats or default.repeats,
        update_frequencies=tuple(msg.update_frequencies) or default.update_frequencies,
        sweep_tokens=msg.sweep_tokens or max(2, min(default.sweep_tokens, engine.sweep_room)),
        experts_per_layer=tuple(msg.experts_per_layer),
    )


def describe_pb(engine: Engine) -> epb.DescribeResponse:
    return epb.DescribeResponse(
        node_id=engine.config.node_id,
        layout=convert.layout_to_pb(engine.layout),
        device=convert.device_to_pb(engine.device_info),
        budget_bytes=engine.budget_bytes,
        min_budget_bytes=engine.min_budget_bytes,
        plan=convert.plan_to_pb(engine.plan),
        achieved_experts_per_layer=engine.achieved,
        memory=convert.memory_to_pb(engine.memory()),
        reserve=convert.reserve_to_pb(engine.memory_model.reserve),
    )


def progress_to_pb(progress: ProfileProgress) -> epb.ProfileProgress:
    msg = epb.ProfileProgress(fraction=progress.fraction, stage=progress.stage)
    if progress.result is not None:
        msg.result.CopyFrom(convert.device_profile_to_pb(progress.result))
    return msg


def serve(engine: Engine, address: str = "127.0.0.1:0", max_subscribers: int = 32,
          security: ServerSecurity | None = None) -> transport.Server:
    """Start ExecutorService (plus health and reflection) for ``engine``. Streams have slots of
    their own: every generation the scheduler admits (a batch running, ``max_queue`` waiting) and a few
    more (so a client past the queue hears the queue's own answer), up to ``max_subscribers``
    telemetry streams and two Profile calls (one runs, one waits); unary calls keep threads
    of their own beside them. ``security``: TLS and the tokens accepted (``swapmoe.rpc.security``)."""
    stream_limits = {"Generate": engine.config.max_queue + engine.scheduler.capacity + 4,
                     "Subscribe": max_subscribers, "Profile": 2}
    return transport.start_server(
        lambda server: executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(engine), server),
        [SERVICE_NAME],
        address,
        stream_limits,
        security=security,
    )
