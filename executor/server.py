"""ExecutorService over gRPC: thin translators between protos and the engine."""

from __future__ import annotations

import contextlib
import time

from executor.admission import Cancelled
from executor.engine import Chunk, Engine
from executor.generation import GenerationRequest, SamplingParams
from executor.profiling import profile
from swapmoe import convert, rpc
from swapmoe.plan import InvalidField
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
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidField("prompt", "is missing: set text or token_ids")
    if kind == "text" and not msg.text.strip():
        raise InvalidField("prompt.text", "is empty")
    ids = engine.tokenize(msg.text) if kind == "text" else tuple(msg.token_ids.ids)
    if not ids:
        raise InvalidField(f"prompt.{kind}", "is empty")
    if msg.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InvalidField("max_new_tokens", f"{msg.max_new_tokens} is above the limit of {MAX_NEW_TOKENS_LIMIT}")
    s = msg.sampling
    sampling = SamplingParams(s.temperature, s.top_p or 1.0, s.top_k, s.seed if s.HasField("seed") else None)
    return GenerationRequest(ids, msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, sampling, tuple(msg.stop))


def chunk_to_pb(chunk: Chunk) -> epb.GenerateResponse:
    msg = epb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text)
    if chunk.finish_reason:
        msg.finish_reason = _FINISH[chunk.finish_reason]
        msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=chunk.prompt_tokens,
                                            completion_tokens=chunk.completion_tokens))
        msg.timings.CopyFrom(common_pb2.Timings(**chunk.timings))
    return msg


class TelemetryReporter:
    """Builds one subscriber's periodic reports; keeps its own previous counters for rates."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._tokens = (time.monotonic(), engine.stats.tokens_total)
        self._experts = None
        self._swaps = engine.swap_stats()

    def reports(self, topics: frozenset[int]) -> list[tpb.TelemetryEvent]:
        engine, hub, out = self.engine, self.engine.hub, []
        if tpb.TOPIC_MEMORY in topics:
            out.append(hub.make(memory=convert.memory_to_pb(engine.memory())))
        if tpb.TOPIC_THROUGHPUT in topics:
            out.append(hub.make(throughput=self._throughput()))
        if tpb.TOPIC_EXPERTS in topics:
            out.append(hub.make(experts=self._experts_report()))
        if tpb.TOPIC_SWAPS in topics:
            out.append(hub.make(swaps=self._swaps_report()))
        if tpb.TOPIC_PLAN in topics:
            out.append(hub.make(plan=tpb.PlanReport(plan=convert.plan_to_pb(engine.plan),
                                                    achieved_experts_per_layer=engine.achieved)))
        return out

    def _throughput(self) -> tpb.ThroughputReport:
        snap = self.engine.stats.snapshot()
        now = time.monotonic()
        then, tokens = self._tokens
        self._tokens = (now, snap["tokens_total"])
        return tpb.ThroughputReport(tokens_per_second=(snap["tokens_total"] - tokens) / max(now - then, 1e-9),
                                    queue_depth=self.engine.admission.waiting, **snap)

    def _swaps_report(self) -> tpb.SwapReport:
        (loads, nbytes, seconds), (pl, pb, ps) = self.engine.swap_stats(), self._swaps
        self._swaps = (loads, nbytes, seconds)
        return tpb.SwapReport(experts_loaded=loads - pl, bytes_loaded=nbytes - pb, load_ns=int((seconds - ps) * 1e9),
                              experts_loaded_total=loads, tier=self.engine.runtime.tier)

    def _experts_report(self) -> tpb.ExpertReport:
        stats = self.engine.expert_stats()
        previous = self._experts or [([0] * len(a), [0.0] * len(i), r) for a, i, r in stats]
        self._experts = stats
        return tpb.ExpertReport(layers=[
            tpb.LayerExperts(layer=n, activations=[x - y for x, y in zip(a, pa)],
                             importance=[x - y for x, y in zip(i, pi)], resident=r)
            for n, ((a, i, r), (pa, pi, _)) in enumerate(zip(stats, previous))
        ])


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    def Generate(self, request, context):
        # A client that cancels or passes its deadline stops the work: while queued, between
        # tokens, and by closing the stream.
        chunks = self.engine.generate(request_from_pb(request, self.engine), cancelled=lambda: not context.is_active())
        with contextlib.closing(chunks):
            try:
                for chunk in chunks:
                    yield chunk_to_pb(chunk)
            except Cancelled:
                return

    def Subscribe(self, request, context):
        if request.interval_ms and request.interval_ms < 10:
            raise InvalidField("interval_ms", f"must be at least 10 ms, got {request.interval_ms}")
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
        for progress in profile(self.engine, tuple(request.token_counts) or (1, 4, 16, 64), request.repeats or 5):
            if not context.is_active():
                return
            yield progress


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
    )


def serve(engine: Engine, address: str = "127.0.0.1:0") -> rpc.Server:
    """Start ExecutorService (plus health and reflection) for ``engine``."""
    return rpc.start_server(
        lambda server: executor_pb2_grpc.add_ExecutorServiceServicer_to_server(ExecutorServicer(engine), server),
        [SERVICE_NAME],
        address,
    )
