"""The executor's dial-out stream to its planner.

The executor opens the connection (so a device behind NAT or a firewall still
works), registers (naming the model it serves by its content fingerprint), sends each
budget set on the device up at once, as a message of its own (a budget that came with a
plan is in that plan's result), and the telemetry the planner asks for in its Welcome, and
applies the plans that come down, answering each with an ACK or a NACK. When the
planner is away the executor keeps its last good plan and keeps retrying;
each new connection starts with a fresh registration, which resyncs the planner.
The planner's first answer carries this node id's secret, sent back in every later
registration (and kept in the state directory, when there is one, across restarts):
it proves the executor is the one already connected under its node id.

The planner may also ask for a device profile down the stream: it runs through
``Engine.profile`` on a thread of its own (the link keeps reading plans and sending
telemetry meanwhile) and its outcome goes up; a cancel from the planner, or the stream
ending, stops it between measurements.

Reconnects are jittered, so a fleet does not stampede a planner that restarts: the link keeps
one channel, whose transport reconnects with gRPC's own connection backoff (±20% jitter, capped
at ``Reconnect.maximum_s``), and a new stream waits for it (``wait_for_ready``). After a
stream fails or ends, the next one starts after a full-jitter exponential delay
(``backoff_delays``), from the start again once a stream has stayed up ``Reconnect.stable_s``.

Telemetry windows are per stream: each experts report counts the activations routed
since the previous one (since the Welcome, for the first), the recent window from which
the planner recognises the workload a device is serving.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc

from swapmoe.core.limits import MAX_REASON_CHARS, MAX_SUBSCRIBE_INTERVAL_MS
from swapmoe.core.plan import PlanResult
from swapmoe.executor.serving_loop import Cancelled
from swapmoe.executor.engine import Engine
from swapmoe.executor.plans import SECRET_FILE, read_secret
from swapmoe.executor.server import describe_pb, profile_spec_from_pb
from swapmoe.executor.telemetry import TelemetryReporter
from swapmoe.rpc import convert, transport
from swapmoe.rpc.security import ClientSecurity
from swapmoe.rpc.status import status_for
from swapmoe.v1 import common_pb2, planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
# What the planner may ask for upstream, and how often: faster than 10 reports a second
# would cost the device more than the planner can use.
UPSTREAM_TOPICS = frozenset({tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EXPERTS})
MIN_UPSTREAM_INTERVAL_MS = 100
# Messages waiting to go up past which periodic telemetry is skipped (plan results, budget changes
# and profiles always go): a planner that stops reading costs the device a bounded queue.
MAX_TELEMETRY_BACKLOG = 64


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How the link comes back. The delay before the n-th new stream in a row is uniform in
    [0, min(maximum_s, initial_s * multiplier**n)] (full jitter); the transport underneath reconnects
    with gRPC's connection backoff (initial_s, growing 1.6x with ±20% jitter, capped at maximum_s).
    A planner back up is therefore reached within about 1.2 * maximum_s."""

    initial_s: float = 1.0
    maximum_s: float = 10.0
    multiplier: float = 2.0
    stable_s: float = 60.0  # a stream up this long was a success: the delays start again from initial_s
    connect_timeout_s: float = 20.0  # what one connection attempt may take (gRPC's default), TLS included

    def __post_init__(self):
        if not 0 < self.initial_s <= self.maximum_s or self.multiplier < 1 or self.connect_timeout_s <= 0:
            raise ValueError(f"reconnect: need 0 < initial_s <= maximum_s, multiplier >= 1, got {self}")

    def channel_options(self) -> list[tuple[str, int]]:
        return [("grpc.initial_reconnect_backoff_ms", round(self.initial_s * 1000)),
                ("grpc.max_reconnect_backoff_ms", round(self.maximum_s * 1000)),
                # Despite its name, gRPC core's minimum connect timeout (doc/connection-backoff.md).
                ("grpc.min_reconnect_backoff_ms", round(self.connect_timeout_s * 1000))]


def backoff_delays(initial: float, maximum: float, multiplier: float, rng: random.Random) -> Iterator[float]:
    """Full-jitter exponential backoff: uniform in [0, cap], the cap growing ``multiplier``-fold from
    ``initial`` up to ``maximum``. Executors that lost one planner at the same instant draw
    independent delays, so their retries spread over the whole window instead of arriving together."""
    cap = initial
    while True:
        yield rng.uniform(0.0, cap)
        cap = min(maximum, cap * multiplier)


class PlannerLink:
    def __init__(self, engine: Engine, planner_address: str, executor_address: str = "",
                 labels: dict[str, str] | None = None, security: ClientSecurity | None = None,
                 reconnect: Reconnect = Reconnect(), rng: random.Random | None = None):
        self.engine = engine
        self.reconnect = reconnect
        self._rng = rng or random.Random()
        self.security = security
        self.labels = {**default_labels(engine), **(labels or {})}
        self.planner_address = planner_address
        self.executor_address = executor_address
        self._stop = threading.Event()
        self._call = None
        self._unreachable = False  # logged once per outage, not at every transport retry
        self._welcomed_at: float | None = None  # when the current stream's Welcome came
        self.connected = threading.Event()
        self.node_secret = read_secret(engine.config.state_dir)
        self._thread = threading.Thread(target=self._run, daemon=True, name="planner-link")

    def start(self) -> "PlannerLink":
        if self.engine.config.state_dir is None:
            log.warning("no --state-dir: the secret the planner issues to node id %r is kept in memory only; once "
                        "this process restarts, the planner refuses the id until an operator runs `swapmoe planner "
                        "forget %s` or it expires", self.engine.config.node_id, self.engine.config.node_id)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        settings = self.reconnect
        options = transport.CHANNEL_OPTIONS + settings.channel_options()
        with (self.security or ClientSecurity()).channel(self.planner_address, options) as channel:
            channel.subscribe(self._on_transport)
            try:
                self._retry(channel, settings)
            finally:
                channel.unsubscribe(self._on_transport)

    def _retry(self, channel: grpc.Channel, settings: Reconnect) -> None:
        delays = None
        while not self._stop.is_set():
            self._welcomed_at = None
            try:
                self._session(channel)
                outcome = "stream ended"
            except grpc.RpcError as error:
                outcome = f"{error.code().name} ({error.details()})"
            except Exception as error:  # noqa: BLE001 - a bug must not end the link: say it, and come back
                log.exception("planner %s: the stream failed", self.planner_address)
                outcome = f"stream failed ({type(error).__name__}: {error})"
            self.connected.clear()
            if self._stop.is_set():
                return
            stayed_up = self._welcomed_at is not None and time.monotonic() - self._welcomed_at >= settings.stable_s
            if delays is None or stayed_up:
                delays = backoff_delays(settings.initial_s, settings.maximum_s, settings.multiplier, self._rng)
            delay = next(delays)
            log.warning("planner %s: %s; keeping plan %d, new stream in %.1fs", self.planner_address, outcome,
                        self.engine.plan.version, delay)
            self._stop.wait(delay)

    def _on_transport(self, state: grpc.ChannelConnectivity) -> None:
        """Say once per outage that the planner is unreachable; gRPC retries the connection meanwhile."""
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and not self._unreachable:
            log.warning("planner %s unreachable; keeping plan %d, reconnecting with backoff (at most %.0fs apart)",
                        self.planner_address, self.engine.plan.version, self.reconnect.maximum_s * 1.2)
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.READY):
            self._unreachable = state is grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def registration(self) -> ppb.Registration:
        described = describe_pb(self.engine)
        return ppb.Registration(
            node_id=described.node_id, device=described.device, budget_bytes=described.budget_bytes,
            min_budget_bytes=described.min_budget_bytes, layout=described.layout,
            current_plan=described.plan, executor_address=self.executor_address, reserve=described.reserve,
            node_secret=self.node_secret, model_fingerprint=self.engine.model_fingerprint,
            labels=self.labels,
        )

    def _session(self, channel: grpc.Channel) -> None:
        outbox: queue.Queue = queue.Queue()
        outbox.put(ppb.ExecutorMessage(registration=self.registration()))
        # A budget set on the device goes up at once as its own message, whatever the Welcome asked.
        unwatch = self.engine.on_budget_change(
            lambda change: outbox.put(ppb.ExecutorMessage(budget_change=convert.budget_change_to_pb(change))))
        profiles: dict[str, threading.Event] = {}  # running profiles by request id: set to cancel
        ended = threading.Event()  # stops this stream's periodic telemetry
        # wait_for_ready: while the planner is away the stream waits for the transport's next
        # connection instead of failing at once, so gRPC's jittered connection backoff paces retries.
        self._call = planner_pb2_grpc.PlannerServiceStub(channel).Connect(_drain(outbox), wait_for_ready=True)
        if self._stop.is_set():  # stop() may have run before this call existed to be cancelled
            self._call.cancel()
        try:
            for message in self._call:
                try:
                    self._handle(message, outbox, profiles, ended)
                except Exception:  # noqa: BLE001 - one message that fails leaves the stream to the next
                    log.exception("planner %s: a %s message failed", self.planner_address,
                                  message.WhichOneof("message"))
        finally:
            ended.set()
            unwatch()
            for cancel in list(profiles.values()):  # the answer has nowhere to go: stop measuring
                cancel.set()
            outbox.put(None)

    def _handle(self, message: ppb.PlannerMessage, outbox: queue.Queue, profiles: dict[str, threading.Event],
                ended: threading.Event) -> None:
        kind = message.WhichOneof("message")
        if kind == "welcome":
            self._welcomed_at = time.monotonic()
            self._keep_secret(message.welcome.node_secret)
            self._start_telemetry(message.welcome, outbox, ended)
            self.connected.set()
            log.info("connected to planner %s", self.planner_address)
        elif kind == "plan":
            outbox.put(ppb.ExecutorMessage(plan_result=self._apply(message.plan)))
        elif kind == "profile_request":
            self._start_profile(message.profile_request, outbox, profiles)
        elif kind == "cancel_profile" and message.cancel_profile in profiles:
            profiles[message.cancel_profile].set()

    def _keep_secret(self, secret: str) -> None:
        """Kept in memory at once; in the state directory owner-only, retried while it cannot be written."""
        if secret and secret != self.node_secret:
            self.node_secret = secret
            self.engine.keep_state(SECRET_FILE, secret, 0o600)

    def _apply(self, plan_pb: common_pb2.Plan) -> common_pb2.PlanResult:
        """The plan's ACK or NACK; a plan that fails in any way is answered too, never left pending."""
        try:
            result = self.engine.apply_plan(convert.plan_from_pb(plan_pb))
        except Exception as error:  # noqa: BLE001 - a malformed plan, or a failure applying it: a NACK
            if status_for(error) is grpc.StatusCode.INTERNAL:
                log.exception("plan %d failed", plan_pb.version)
            reason = (str(error) or type(error).__name__)[:MAX_REASON_CHARS]
            result = PlanResult(plan_pb.version, False, reason, memory=self.engine.memory())
        return convert.plan_result_to_pb(result)

    def _start_profile(self, ask: ppb.ProfileAsk, outbox: queue.Queue, profiles: dict[str, threading.Event]) -> None:
        cancel = profiles[ask.request_id] = threading.Event()

        def run():
            try:
                outbox.put(ppb.ExecutorMessage(profile_result=self._profile(ask, cancel)))
            finally:
                profiles.pop(ask.request_id, None)

        threading.Thread(target=run, daemon=True, name=f"profile-{ask.request_id}").start()

    def _profile(self, ask: ppb.ProfileAsk, cancel: threading.Event) -> ppb.ProfileOutcome:
        """Run one profile to its end; a failure is an outcome too, with its status code."""
        outcome = ppb.ProfileOutcome(request_id=ask.request_id)
        try:
            progress = self.engine.profile(profile_spec_from_pb(ask.request, self.engine),
                                           cancelled=lambda: cancel.is_set() or self._stop.is_set())
            with contextlib.closing(progress):
                for step in progress:
                    if step.result is not None:
                        outcome.result.CopyFrom(convert.device_profile_to_pb(step.result))
        except Cancelled:
            outcome.error, outcome.error_code = "cancelled", grpc.StatusCode.CANCELLED.value[0]
        except Exception as error:  # noqa: BLE001 - every failure is answered, with its status
            if status_for(error) is grpc.StatusCode.INTERNAL:
                log.exception("profile %s failed", ask.request_id)
            outcome.error = (str(error) or type(error).__name__)[:MAX_REASON_CHARS]
            outcome.error_code = status_for(error).value[0]
        return outcome

    def _start_telemetry(self, welcome: ppb.Welcome, outbox: queue.Queue, ended: threading.Event) -> None:
        """Report what the Welcome asks for, every ``telemetry_interval_ms`` (0: nothing periodic)."""
        topics = frozenset(welcome.topics) & UPSTREAM_TOPICS
        if welcome.telemetry_interval_ms and topics:
            interval_ms = min(max(welcome.telemetry_interval_ms, MIN_UPSTREAM_INTERVAL_MS), MAX_SUBSCRIBE_INTERVAL_MS)
            threading.Thread(target=self._report, args=(interval_ms / 1000, topics, outbox, ended),
                             daemon=True, name="planner-telemetry").start()

    def _report(self, interval: float, topics: frozenset[int], outbox: queue.Queue, ended: threading.Event) -> None:
        """One reporter per stream: its windows start at the Welcome and never span two streams."""
        reporter = TelemetryReporter(self.engine)
        while not ended.wait(interval):
            if outbox.qsize() >= MAX_TELEMETRY_BACKLOG:  # the planner is not reading: skip, never pile up
                log.debug("planner %s reads slowly: telemetry report skipped", self.planner_address)
                continue
            for event in reporter.reports(topics):
                outbox.put(ppb.ExecutorMessage(telemetry=event))


def _drain(outbox: queue.Queue):
    while (message := outbox.get()) is not None:
        yield message


def default_labels(engine: Engine) -> dict[str, str]:
    """What every executor is labelled with unless told otherwise: its model (the checkpoint's
    directory name, what a client asks for) and its torch device type."""
    model = Path(engine.config.model_dir).name or "model"
    return {"model": "".join(c if c.isalnum() or c in "-_." else "-" for c in model)[:63].strip("-_.") or "model",
            "device": str(engine.device_info.kind or "cpu").split(":")[0]}

