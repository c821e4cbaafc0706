"""Telemetry: events fanned out to subscribers that never slow the producer, and the
periodic reports (memory, throughput, experts, swaps, plan) each subscriber receives.

Each subscriber has a bounded queue; when it is full the oldest event is
dropped and counted, and the count travels with the next event delivered
(``TelemetryEvent.dropped``). Publishing never blocks. A subscriber that may not see other
tenants' requests never receives a finished-request event (its id, tokens and timings).
"""

from __future__ import annotations

import collections
import enum
import threading
import time

from swapmoe.rpc import convert
from swapmoe.v1 import telemetry_pb2 as tpb

ALL_TOPICS = frozenset(t for t in tpb.Topic.values() if t != tpb.TOPIC_UNSPECIFIED)
_PAYLOAD_TOPIC = {
    "memory": tpb.TOPIC_MEMORY,
    "throughput": tpb.TOPIC_THROUGHPUT,
    "experts": tpb.TOPIC_EXPERTS,
    "swaps": tpb.TOPIC_SWAPS,
    "plan": tpb.TOPIC_PLAN,
    "event": tpb.TOPIC_EVENTS,
}


def topic_of(event: tpb.TelemetryEvent) -> int:
    return _PAYLOAD_TOPIC[event.WhichOneof("payload")]


class Subscription:
    """One subscriber's queue; ``next`` numbers events and reports drops."""

    def __init__(self, topics: frozenset[int], capacity: int, requests: bool = True):
        self.topics = topics
        self.requests = requests  # receives KIND_REQUEST_FINISHED events
        self._queue: collections.deque = collections.deque(maxlen=capacity)
        self._ready = threading.Condition()
        self._dropped = 0
        self._sequence = 0
        self.closed = False

    def offer(self, event: tpb.TelemetryEvent) -> None:
        with self._ready:
            if len(self._queue) == self._queue.maxlen:
                self._dropped += 1  # deque drops the oldest
            self._queue.append(event)
            self._ready.notify()

    def next(self, timeout: float) -> tpb.TelemetryEvent | None:
        """The next event, or None after ``timeout`` seconds or once closed."""
        with self._ready:
            if not self._queue and not self.closed:
                self._ready.wait(timeout)
            if not self._queue:
                return None
            return self._stamp(self._queue.popleft())

    def stamp(self, event: tpb.TelemetryEvent) -> tpb.TelemetryEvent:
        with self._ready:
            return self._stamp(event)

    def _stamp(self, event: tpb.TelemetryEvent) -> tpb.TelemetryEvent:
        self._sequence += 1
        out = tpb.TelemetryEvent()
        out.CopyFrom(event)
        out.sequence, out.dropped, self._dropped = self._sequence, self._dropped, 0
        return out

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()


class EventKind(enum.IntEnum):
    """What an event says happened (the wire's ``Event.Kind``), for code that is not an RPC edge."""

    STARTED = tpb.Event.KIND_STARTED
    BUDGET_CHANGED = tpb.Event.KIND_BUDGET_CHANGED
    PLAN_APPLIED = tpb.Event.KIND_PLAN_APPLIED
    PLAN_REJECTED = tpb.Event.KIND_PLAN_REJECTED
    REQUEST_FINISHED = tpb.Event.KIND_REQUEST_FINISHED


class TelemetryHub:
    def __init__(self, node_id: str = ""):
        self.node_id = node_id
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()

    def subscribe(self, topics=(), capacity: int = 256, requests: bool = True) -> Subscription:
        """A subscription to ``topics`` (all when empty); ``requests``: with finished-request events."""
        subscription = Subscription(frozenset(topics) or ALL_TOPICS, capacity, requests)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    def make(self, **payload) -> tpb.TelemetryEvent:
        return tpb.TelemetryEvent(node_id=self.node_id, timestamp_ns=time.time_ns(), **payload)

    def publish(self, event: tpb.TelemetryEvent) -> None:
        topic = topic_of(event)
        private = topic == tpb.TOPIC_EVENTS and event.event.kind == tpb.Event.KIND_REQUEST_FINISHED
        with self._lock:
            targets = [s for s in self._subscribers if topic in s.topics and (s.requests or not private)]
        for subscription in targets:
            subscription.offer(event)

    def event(self, kind: EventKind, message: str, **fields) -> None:
        self.publish(self.make(event=tpb.Event(kind=int(kind), message=message, **fields)))

    def close_all(self) -> None:
        with self._lock:
            subscribers, self._subscribers = self._subscribers, []
        for subscription in subscribers:
            subscription.close()


class TelemetryReporter:
    """Builds one subscriber's periodic reports from an engine; keeps its own previous
    readings, so each report says what happened since the last one (the first: since the
    reporter was made)."""

    def __init__(self, engine):
        self.engine = engine
        self._tokens = (time.monotonic(), engine.stats.tokens_total)
        self._activity = engine.activity()
        self._loads = engine.load_counters()

    def reports(self, topics: frozenset[int]) -> list[tpb.TelemetryEvent]:
        engine, hub, out = self.engine, self.engine.hub, []
        if tpb.TOPIC_MEMORY in topics:
            out.append(hub.make(memory=convert.memory_to_pb(engine.memory())))
        if tpb.TOPIC_THROUGHPUT in topics:
            out.append(hub.make(throughput=self._throughput()))
        if tpb.TOPIC_EXPERTS in topics:
            out.append(hub.make(experts=self._experts()))
        if tpb.TOPIC_SWAPS in topics:
            out.append(hub.make(swaps=self._swaps()))
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
                                    queue_depth=self.engine.queue_depth, running=self.engine.running, **snap)

    def _swaps(self) -> tpb.SwapReport:
        total = self.engine.load_counters()
        since, self._loads = total - self._loads, total
        return tpb.SwapReport(experts_loaded=since.loads, bytes_loaded=since.nbytes, load_ns=int(since.seconds * 1e9),
                              experts_loaded_total=total.loads, tier=self.engine.load_tier)

    def _experts(self) -> tpb.ExpertReport:
        now = self.engine.activity()
        before, self._activity = self._activity, now
        return tpb.ExpertReport(layers=[
            tpb.LayerExperts(layer=n,
                             activations=[x - y for x, y in zip(layer.activations, last.activations)],
                             importance=[x - y for x, y in zip(layer.importance, last.importance)],
                             resident=layer.resident)
            for n, (layer, last) in enumerate(zip(now, before))])
