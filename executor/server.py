"""ExecutorService over gRPC: thin translators between protos and the engine.

Telemetry is per caller: a caller is the name of its token when the server checks tokens, else
its address (host). One caller holds at most ``subscribers_per_caller`` Subscribe streams, so
one client cannot take every slot; and what one tenant's requests reveal (the finished-request
events, with their ids and timings, and the per-expert activation counts their prompts produce)
goes only to callers with the ``control`` or ``viewer`` role. Without tokens every caller is
trusted alike (the server then serves loopback only, unless told it is insecure).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

import grpc

from swapmoe.core import limits
from swapmoe.core.errors import Busy, Forbidden, InvalidField, Unauthenticated
from swapmoe.executor.serving_loop import Cancelled
from swapmoe.executor.engine import Engine
from swapmoe.executor.requests import GenerationRequest, SamplingParams
from swapmoe.executor.device_profiling import ProfileProgress, ProfileSpec
from swapmoe.executor.request_log import RequestRecord, new_request_id, report_request
from swapmoe.executor.telemetry import ALL_TOPICS, TelemetryReporter
from swapmoe.executor.text import Chunk
from swapmoe.rpc import convert, transport
from swapmoe.rpc.auth import CONTROL, VIEWER, TokenTable, bearer_token
from swapmoe.rpc.security import ServerSecurity
from swapmoe.rpc.tls import peer_ip
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
TENANT_TOPICS = frozenset({tpb.TOPIC_EXPERTS})  # topics only callers who see every tenant may ask for
SEE_TENANTS = frozenset({CONTROL, VIEWER})


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
    def __init__(self, engine: Engine, tokens: TokenTable | None = None,
                 subscribers_per_caller: int = limits.MAX_SUBSCRIBERS_PER_CALLER):
        self.engine = engine
        self.tokens = tokens
        self.subscribers_per_caller = subscribers_per_caller
        self._subscribers: collections.Counter[str] = collections.Counter()  # open Subscribe streams per caller
        self._lock = threading.Lock()

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
        caller, roles = caller_of(context, self.tokens)
        sees_tenants = self.tokens is None or bool(roles & SEE_TENANTS)
        if not sees_tenants and (denied := TENANT_TOPICS & set(request.topics)):
            names = ", ".join(tpb.Topic.Name(t) for t in sorted(denied))
            raise Forbidden(f"topics: {names} needs role {' or '.join(sorted(SEE_TENANTS))}; {caller!r} has "
                            f"{', '.join(sorted(roles))}")
        topics = frozenset(request.topics) or (ALL_TOPICS if sees_tenants else ALL_TOPICS - TENANT_TOPICS)
        with self._subscriber_slot(caller):
            yield from self._stream(topics, sees_tenants, (request.interval_ms or 1000) / 1000, context)

    @contextlib.contextmanager
    def _subscriber_slot(self, caller: str):
        with self._lock:
            if self._subscribers[caller] >= self.subscribers_per_caller:
                raise Busy(f"{self.subscribers_per_caller} Subscribe streams of {caller!r} are open, the most one "
                           f"caller may hold; retry once one ends")
            self._subscribers[caller] += 1
        try:
            yield
        finally:
            with self._lock:
                self._subscribers[caller] -= 1
                if not self._subscribers[caller]:
                    del self._subscribers[caller]

    def _stream(self, topics: frozenset[int], sees_tenants: bool, interval: float, context):
        hub = self.engine.hub
        subscription = hub.subscribe(topics, requests=sees_tenants)
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


def caller_of(context: grpc.ServicerContext, tokens: TokenTable | None) -> tuple[str, frozenset[str]]:
    """Who is calling, and with which roles: the name and roles of its token when ``tokens`` are
    checked (the auth interceptor let the call in), else its host and no roles."""
    if tokens is None:
        peer = context.peer()
        return peer_ip(peer) or peer, frozenset()
    issued = tokens.lookup(bearer_token(context.invocation_metadata()) or "")
    if issued is None:
        raise Unauthenticated("the call carries no token this server issued")
    return issued


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
        state_error=engine.state_error,
        threads=engine.threads.setting.threads,
        threads_reason=engine.threads.setting.reason,
    )


def progress_to_pb(progress: ProfileProgress) -> epb.ProfileProgress:
    msg = epb.ProfileProgress(fraction=progress.fraction, stage=progress.stage)
    if progress.result is not None:
        msg.result.CopyFrom(convert.device_profile_to_pb(progress.result))
    return msg


def serve(engine: Engine, address: str = "127.0.0.1:0", max_subscribers: int = 32,
          security: ServerSecurity | None = None,
          subscribers_per_caller: int = limits.MAX_SUBSCRIBERS_PER_CALLER) -> transport.Server:
    """Start ExecutorService (plus health and reflection) for ``engine``. Streams have slots of
    their own: every generation the scheduler admits (a batch running, ``max_queue`` waiting) and a few
    more (so a client past the queue hears the queue's own answer), up to ``max_subscribers``
    telemetry streams (``subscribers_per_caller`` of them per caller) and two Profile calls;
    unary calls keep threads of their own beside them. ``security``: TLS and the tokens accepted
    (``swapmoe.rpc.security``)."""
    stream_limits = {"Generate": engine.config.max_queue + engine.scheduler.capacity + 4,
                     "Subscribe": max_subscribers, "Profile": 2}
    servicer = ExecutorServicer(engine, security.tokens if security is not None else None, subscribers_per_caller)
    return transport.start_server(
        lambda server: executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server),
        [SERVICE_NAME],
        address,
        stream_limits,
        security=security,
    )
