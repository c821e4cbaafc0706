"""One simulated executor: the executor's side of the planner's Connect stream, with no model.

A ``SimNode`` speaks the protocol ``swapmoe.executor.planner_link`` speaks: it registers (with
the secret of its previous Welcome, and the last plan it acknowledged), sends the telemetry the
Welcome asks for, answers every plan with an ACK or a NACK as the executor's ``PlanBook.review``
would (a plan carrying ``budget_bytes`` sets the budget, which its ACK answers: as on a real
executor, no BudgetChange goes up for it), fails every ProfileAsk at once
(FAILED_PRECONDITION: the planner must not wait on it), and registers again with backoff when
its stream ends. Everything runs on one asyncio loop, so one process holds thousands of nodes:
per node, one reader coroutine, one request generator and one telemetry task.

``swapmoe.simulation.fleet`` starts the nodes, spreads them over channels and reports on them.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

import grpc

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.errors import InvalidField
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import DEFAULT_UPDATE_FREQUENCY, Plan, validate_plan
from swapmoe.executor.plans import PlanBook
from swapmoe.rpc import convert
from swapmoe.rpc.transport import CHANNEL_OPTIONS
from swapmoe.v1 import common_pb2, planner_pb2 as ppb, telemetry_pb2 as tpb

MiB, GiB = 1 << 20, 1 << 30
NO_PROFILE = "simulated executor: no device to profile"
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
TOLD_TO_NACK = "simulated executor: set to reject every plan"
# What an executor sends upstream, and its floor on the interval (as planner_link).
UPSTREAM_TOPICS = (tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EXPERTS)
MIN_INTERVAL_S = 0.1
# Messages waiting to go up on one stream past which telemetry is dropped (a planner reading
# slowly must not make the simulator grow without bound; plan answers are never dropped).
MAX_OUTBOX = 64
# Separate connections: without a local subchannel pool, channels to one address share one.
SIM_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
# Labels cycled over node indexes: class alternates a/b, region changes every two nodes.
DEFAULT_LABELS = ({"class": "a", "region": "eu"}, {"class": "b", "region": "eu"},
                  {"class": "a", "region": "us"}, {"class": "b", "region": "us"})


def lm_layout() -> ModelLayout:
    """The bundled LM (models/swapmoe-lm, Mixtral-shaped, float32): 6 MoE layers x 16 experts of
    192 KiB (3 x 128 x 128 weights), 3.2 MiB of dense weights."""
    layers = tuple(LayerLayout(i, f"model.layers.{i}.mlp", 16, 2, 196_608) for i in range(6))
    return ModelLayout("mixtral", "MixtralForCausalLM", layers, 3_334_848, "float32", 4096, 512)


# The bundled LM's reserve at its 512 positions (executor.memory's formulas): KV cache,
# activations, and two experts' staging buffers.
LM_RESERVE = Reserve(staging_bytes=2 * 196_608, kv_cache_bytes=786_432, activation_bytes=8_945_664)


@dataclass
class SimSettings:
    """What a simulated fleet looks like and how it behaves."""

    planner: str  # HOST:PORT of PlannerService
    count: int = 100
    prefix: str = "sim-"
    start: int = 0  # node ids are prefix + zero-padded (start + i), i < count
    digits: int = 5
    # Labels per node: a function of the node's index (start + i), or label sets cycled by index.
    labels: Callable[[int], Mapping[str, str]] | Sequence[Mapping[str, str]] = DEFAULT_LABELS
    budget_bytes: int = 0  # 0: the fixed bytes plus half of the experts
    layout: ModelLayout = field(default_factory=lm_layout)
    reserve: Reserve = LM_RESERVE
    device_memory_bytes: int = 8 * GiB
    model_fingerprint: str = "f1ee700000000000"  # no accuracy profile: the planner sends even splits
    telemetry_interval_s: float | None = None  # None: what the Welcome asks; 0: no telemetry
    nack: Collection[str] | Callable[[str], bool] = frozenset()  # node ids (or a predicate) that NACK every plan
    ack_delay_s: float = 0.0
    connections: int = 0  # channels (TCP connections) the streams are spread over; 0: one per 50 streams
    metadata: Sequence[tuple[str, str]] = ()  # extra call metadata, e.g. ("authorization", "Bearer ...")
    # Makes each channel, on the fleet's loop (e.g. grpc.aio.secure_channel with SIM_CHANNEL_OPTIONS);
    # None: insecure channels.
    channel_factory: Callable[[str], grpc.aio.Channel] | None = None
    reconnect: bool = True  # register again, with backoff, when a stream ends
    ramp_s: float = 0.0  # first registrations spread uniformly over this many seconds
    seed: int = 0

    def __post_init__(self):
        if self.count < 1 or self.start < 0:
            raise ValueError(f"count must be at least 1 and start at least 0 (got {self.count}, {self.start})")
        if self.ack_delay_s < 0 or self.ramp_s < 0 or (self.telemetry_interval_s or 0) < 0:
            raise ValueError("ack_delay_s, ramp_s and telemetry_interval_s cannot be negative")
        self.budget_bytes = self.budget_bytes or half_budget(self.memory_model)
        self.memory_model.check_budget(self.budget_bytes)

    @property
    def memory_model(self) -> MemoryModel:
        return MemoryModel(self.layout, self.reserve, self.device_memory_bytes)

    def node_id(self, i: int) -> str:
        return f"{self.prefix}{self.start + i:0{self.digits}d}"

    def node_ids(self) -> list[str]:
        return [self.node_id(i) for i in range(self.count)]

    def labels_for(self, i: int) -> dict[str, str]:
        index = self.start + i
        return dict(self.labels(index) if callable(self.labels) else self.labels[index % len(self.labels)])

    @property
    def channel_count(self) -> int:
        return self.connections or -(-self.count // 50)


def half_budget(memory: MemoryModel) -> int:
    """A budget holding every fixed byte and half of each layer's experts."""
    return memory.plan_bytes([max(1, layer.num_experts // 2) for layer in memory.layout.layers])


@dataclass
class NodeRecord:
    """What one node saw; times are wall-clock seconds (``time.time()``)."""

    node_id: str
    connected: bool = False  # a Welcome came on the open stream
    first_connected_at: float = 0.0  # first Welcome (0: never)
    connected_at: float = 0.0  # latest Welcome
    streams: int = 0  # Welcomes received
    plans: list[tuple[int, float]] = field(default_factory=list)  # (version, received)
    answers: list[tuple[int, float, bool]] = field(default_factory=list)  # (version, sent, accepted)
    last_error: str = ""  # how the latest stream ended with an error: "CODE: details"

    @property
    def acked_version(self) -> int:
        """The newest plan version this node ACKed, 0 if none."""
        return max((v for v, _, ok in self.answers if ok), default=0)

    @property
    def pending(self) -> bool:
        """A plan received and not answered yet."""
        return bool(self.plans) and (not self.answers or self.answers[-1][0] != self.plans[-1][0])


@dataclass
class Counters:
    """Fleet-wide totals, counted on the loop's thread."""

    connected: int = 0  # streams open now with a Welcome
    streams: int = 0  # Welcomes received in all
    reconnects: int = 0  # Welcomes after a node's first
    plans: int = 0
    acks: int = 0
    nacks: int = 0
    budget_changes: int = 0  # plans that changed the budget (their ACK says so; no BudgetChange goes up)
    telemetry: int = 0  # telemetry events sent
    telemetry_dropped: int = 0
    profile_asks: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)  # stream ends by status code


@dataclass
class Fleetwide:
    """What every node of a fleet shares: the settings, the counters, who NACKs, and the
    expert histograms telemetry draws from (built once: per-report randomness costs CPU)."""

    settings: SimSettings
    counters: Counters = field(default_factory=Counters)
    nack: Collection[str] | Callable[[str], bool] = frozenset()
    histograms: list[list[list[int]]] = field(default_factory=list)  # [pattern][layer][expert]: tokens

    def __post_init__(self):
        self.nack = self.settings.nack
        rng = random.Random(self.settings.seed)
        self.histograms = [[[rng.randint(0, 4) for _ in range(layer.num_experts)] for layer in self.settings.layout.layers]
                           for _ in range(16)]

    def nacks(self, node_id: str) -> bool:
        return self.nack(node_id) if callable(self.nack) else node_id in self.nack


class SimNode:
    """One simulated executor; ``run`` is its whole life on the loop."""

    def __init__(self, i: int, fleet: Fleetwide):
        settings = fleet.settings
        self.fleet, self.settings = fleet, settings
        self.node_id = settings.node_id(i)
        self.record = NodeRecord(self.node_id)
        self.labels = settings.labels_for(i)
        self.memory = settings.memory_model
        self.book = PlanBook(self.memory, settings.budget_bytes)  # the executor's own rules for plans and budgets
        self.book.current = Plan(0, self.memory.fit(settings.budget_bytes), DEFAULT_UPDATE_FREQUENCY,
                                 origin="fleet-sim:initial")
        self.secret = ""
        self.rng = random.Random(f"{settings.seed}:{self.node_id}")
        self.tokens = self.requests = 0
        self._outbox: asyncio.Queue | None = None

    async def run(self, stub) -> None:
        if self.settings.ramp_s:
            await asyncio.sleep(self.rng.uniform(0, self.settings.ramp_s))
        backoff = 0.2
        while True:
            streams = self.record.streams
            try:
                await self._session(stub)
            except grpc.aio.AioRpcError as error:
                self.fleet.counters.errors[error.code().name] += 1
                self.record.last_error = f"{error.code().name}: {error.details()}"
            if not self.settings.reconnect:
                return
            backoff = 0.2 if self.record.streams > streams else min(backoff * 2, 5.0)
            await asyncio.sleep(backoff * self.rng.uniform(0.5, 1.5))  # jittered: no reconnect storms

    def registration(self) -> ppb.Registration:
        s = self.settings
        return ppb.Registration(
            node_id=self.node_id, budget_bytes=self.budget, min_budget_bytes=self.memory.min_budget_bytes,
            device=common_pb2.DeviceInfo(kind="cpu", name="fleet-sim", memory_bytes=s.device_memory_bytes,
                                         cpu_count=4, hostname=socket.gethostname()),
            layout=convert.layout_to_pb(s.layout), current_plan=convert.plan_to_pb(self.plan), executor_address="",
            reserve=convert.reserve_to_pb(s.reserve), node_secret=self.secret,
            model_fingerprint=s.model_fingerprint, labels=self.labels)

    async def _session(self, stub) -> None:
        outbox = self._outbox = asyncio.Queue()
        outbox.put_nowait(ppb.ExecutorMessage(registration=self.registration()))
        call = stub.Connect(_drain(outbox), metadata=tuple(self.settings.metadata) or None)
        tasks: set[asyncio.Task] = set()  # this stream's telemetry and delayed answers
        try:
            async for message in call:
                kind = message.WhichOneof("message")
                if kind == "welcome":
                    self._welcomed(message.welcome, tasks)
                elif kind == "plan":
                    self._received(message.plan, tasks)
                elif kind == "profile_request":
                    self.fleet.counters.profile_asks += 1
                    outbox.put_nowait(ppb.ExecutorMessage(profile_result=ppb.ProfileOutcome(
                        request_id=message.profile_request.request_id, error=NO_PROFILE,
                        error_code=FAILED_PRECONDITION)))
        finally:
            for task in tasks:
                task.cancel()
            self._outbox = None
            outbox.put_nowait(None)
            call.cancel()
            if self.record.connected:
                self.record.connected = False
                self.fleet.counters.connected -= 1

    def _welcomed(self, welcome: ppb.Welcome, tasks: set[asyncio.Task]) -> None:
        now, counters = time.time(), self.fleet.counters
        self.secret = welcome.node_secret or self.secret
        self.record.connected, self.record.connected_at = True, now
        self.record.first_connected_at = self.record.first_connected_at or now
        self.record.streams += 1
        counters.connected += 1
        counters.streams += 1
        counters.reconnects += self.record.streams > 1
        interval = self.settings.telemetry_interval_s
        interval = welcome.telemetry_interval_ms / 1000 if interval is None else interval
        topics = [t for t in UPSTREAM_TOPICS if t in welcome.topics]
        if interval and topics:
            _spawn(tasks, self._report(max(interval, MIN_INTERVAL_S), topics))

    def _received(self, plan: common_pb2.Plan, tasks: set[asyncio.Task]) -> None:
        self.record.plans.append((plan.version, time.time()))
        self.fleet.counters.plans += 1
        if self.settings.ack_delay_s:
            _spawn(tasks, self._answer_later(plan))
        else:
            self._answer(plan)

    async def _answer_later(self, plan: common_pb2.Plan) -> None:
        await asyncio.sleep(self.settings.ack_delay_s)
        self._answer(plan)

    def _answer(self, plan_pb: common_pb2.Plan) -> None:
        start, previous = time.perf_counter_ns(), self.budget
        reason = self._apply(plan_pb)
        result = common_pb2.PlanResult(plan_version=plan_pb.version, accepted=not reason, reason=reason,
                                       memory=self._memory(), apply_ns=time.perf_counter_ns() - start)
        if not reason:
            result.achieved_experts_per_layer.extend(plan_pb.experts_per_layer)
            within = self.memory.rows_within(self.plan.experts_per_layer, self.budget)
            result.achieved_rows = min(self.plan.rows or within, within)  # as the executor's batch_rows
        self._send(ppb.ExecutorMessage(plan_result=result))
        self.record.answers.append((plan_pb.version, time.time(), not reason))
        counters = self.fleet.counters
        counters.acks += not reason
        counters.nacks += bool(reason)
        counters.budget_changes += self.budget != previous

    def _apply(self, plan_pb: common_pb2.Plan) -> str:
        """Why the plan is rejected (the executor's reasons), or "" once it is applied."""
        if self.fleet.nacks(self.node_id):
            return TOLD_TO_NACK
        try:
            plan = convert.plan_from_pb(plan_pb)
            validate_plan(plan, self.settings.layout)
        except InvalidField as error:
            return str(error)
        if reason := self.book.review(plan):
            return reason
        budget = plan.budget_bytes or self.budget
        self.book.accept(plan)
        self.book.set_budget(budget)
        return ""

    @property
    def plan(self) -> Plan:
        return self.book.current

    @property
    def budget(self) -> int:
        return self.book.budget_bytes

    def _send(self, message: ppb.ExecutorMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    async def _report(self, interval: float, topics: list[int]) -> None:
        """Every ``interval``, one event per topic; the first after a random share of it, so a
        fleet that connected at once does not report in lockstep."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.rng.uniform(0, interval)
        sequence = 0
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due += interval
            if self._outbox is None or self._outbox.qsize() > MAX_OUTBOX:
                self.fleet.counters.telemetry_dropped += len(topics)
                continue
            for topic in topics:
                sequence += 1
                self._send(ppb.ExecutorMessage(telemetry=self._telemetry(topic, sequence, interval)))
            self.fleet.counters.telemetry += len(topics)

    def _telemetry(self, topic: int, sequence: int, interval: float) -> tpb.TelemetryEvent:
        event = tpb.TelemetryEvent(node_id=self.node_id, sequence=sequence, timestamp_ns=time.time_ns())
        if topic == tpb.TOPIC_MEMORY:
            event.memory.CopyFrom(self._memory())
        elif topic == tpb.TOPIC_THROUGHPUT:
            event.throughput.CopyFrom(self._throughput(interval))
        else:
            event.experts.CopyFrom(self._experts())
        return event

    def _memory(self) -> common_pb2.MemoryReport:
        reserve, dense = self.settings.reserve, self.settings.layout.dense_bytes
        experts = self.settings.layout.expert_bytes(self.plan.experts_per_layer)
        accounted = dense + experts + reserve.kv_cache_bytes + reserve.activation_bytes
        rss = accounted + reserve.staging_bytes + 48 * MiB  # the interpreter and libraries
        return common_pb2.MemoryReport(budget_bytes=self.budget, accounted_bytes=accounted, dense_bytes=dense,
                                       expert_bytes=experts, kv_cache_bytes=reserve.kv_cache_bytes,
                                       activation_bytes=reserve.activation_bytes, process_rss_bytes=rss,
                                       process_peak_rss_bytes=rss)

    def _throughput(self, interval: float) -> tpb.ThroughputReport:
        rate = self.rng.uniform(15.0, 40.0)
        self.tokens += int(rate * interval)
        self.requests += self.rng.randint(0, 2)
        inter_token = int(1e9 / rate)
        return tpb.ThroughputReport(tokens_per_second=rate, tokens_total=self.tokens, requests_total=self.requests,
                                    queue_depth=self.rng.randint(0, 2), time_to_first_token_p50_ns=3 * inter_token,
                                    inter_token_p50_ns=inter_token, inter_token_p99_ns=2 * inter_token)

    def _experts(self) -> tpb.ExpertReport:
        """Tokens per expert from one of the fleet's histograms; the resident experts are the first
        k of each layer (the simulator runs no router)."""
        histogram = self.rng.choice(self.fleet.histograms)
        return tpb.ExpertReport(layers=[
            tpb.LayerExperts(layer=i, activations=counts, resident=range(k))
            for i, (counts, k) in enumerate(zip(histogram, self.plan.experts_per_layer))])


def _spawn(tasks: set[asyncio.Task], coroutine) -> None:
    task = asyncio.ensure_future(coroutine)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _drain(outbox: asyncio.Queue):
    while (message := await outbox.get()) is not None:
        yield message
