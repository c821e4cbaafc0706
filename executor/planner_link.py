"""The executor's dial-out stream to its planner.

The executor opens the connection (so a device behind NAT or a firewall still
works), registers (naming the model it serves by its content fingerprint), sends
budget changes up at once and the telemetry the planner asks for in its Welcome, and
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

Telemetry windows are per stream: each experts report counts the activations routed
since the previous one (since the Welcome, for the first), the recent window from which
the planner recognises the workload a device is serving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.core.fingerprint import model_fingerprint
from swapmoe.core.limits import MAX_REASON_CHARS, MAX_SUBSCRIBE_INTERVAL_MS
from swapmoe.core.plan import PlanResult
from swapmoe.executor.scheduler import Cancelled
from swapmoe.executor.engine import Engine
from swapmoe.executor.server import describe_pb, profile_spec_from_pb
from swapmoe.executor.telemetry import TelemetryReporter
from swapmoe.rpc import convert, transport
from swapmoe.rpc.security import ClientSecurity
from swapmoe.rpc.status import status_for
from swapmoe.v1 import common_pb2, planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SECRET_FILE = "node_secret"
# What the planner may ask for upstream, and how often: faster than 10 reports a second
# would cost the device more than the planner can use.
UPSTREAM_TOPICS = frozenset({tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EXPERTS})
MIN_UPSTREAM_INTERVAL_MS = 100
# Messages waiting to go up past which periodic telemetry is skipped (plan results, budget changes
# and profiles always go): a planner that stops reading costs the device a bounded queue.
MAX_TELEMETRY_BACKLOG = 64


class PlannerLink:
    def __init__(self, engine: Engine, planner_address: str, executor_address: str = "",
                 labels: dict[str, str] | None = None, security: ClientSecurity | None = None):
        self.engine = engine
        self.security = security
        self.labels = {**default_labels(engine), **(labels or {})}
        self.planner_address = planner_address
        self.executor_address = executor_address
        self._stop = threading.Event()
        self._call = None
        self.connected = threading.Event()
        state_dir = engine.config.state_dir
        self._secret_file = Path(state_dir) / SECRET_FILE if state_dir is not None else None
        self.node_secret = _read_secret(self._secret_file)
        self._thread = threading.Thread(target=self._run, daemon=True, name="planner-link")

    def start(self) -> "PlannerLink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self._session()
                backoff = 0.2
            except grpc.RpcError as error:
                if self._stop.is_set():
                    return
                log.warning("planner %s: %s (%s); keeping plan %d, retrying in %.1fs", self.planner_address,
                            error.code().name, error.details(), self.engine.plan.version, backoff)
            self.connected.clear()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def registration(self) -> ppb.Registration:
        described = describe_pb(self.engine)
        return ppb.Registration(
            node_id=described.node_id, device=described.device, budget_bytes=described.budget_bytes,
            min_budget_bytes=described.min_budget_bytes, layout=described.layout,
            current_plan=described.plan, executor_address=self.executor_address, reserve=described.reserve,
            node_secret=self.node_secret, model_fingerprint=model_fingerprint(self.engine.config.model_dir),
            labels=self.labels,
        )

    def _session(self) -> None:
        outbox: queue.Queue = queue.Queue()
        outbox.put(ppb.ExecutorMessage(registration=self.registration()))
        hub = self.engine.hub
        events = hub.subscribe([tpb.TOPIC_EVENTS])
        forwarder = threading.Thread(target=self._forward, args=(events, outbox), daemon=True)
        profiles: dict[str, threading.Event] = {}  # running profiles by request id: set to cancel
        ended = threading.Event()  # stops this stream's periodic telemetry
        with transport.channel(self.planner_address, self.security) as channel:
            self._call = planner_pb2_grpc.PlannerServiceStub(channel).Connect(_drain(outbox))
            forwarder.start()
            try:
                for message in self._call:
                    kind = message.WhichOneof("message")
                    if kind == "welcome":
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
            finally:
                ended.set()
                hub.unsubscribe(events)
                for cancel in list(profiles.values()):  # the answer has nowhere to go: stop measuring
                    cancel.set()
                outbox.put(None)

    def _keep_secret(self, secret: str) -> None:
        if secret and secret != self.node_secret:
            self.node_secret = secret
            if self._secret_file is not None:
                _write_secret(self._secret_file, secret)

    def _apply(self, plan_pb: common_pb2.Plan) -> common_pb2.PlanResult:
        try:
            result = self.engine.apply_plan(convert.plan_from_pb(plan_pb))
        except InvalidField as error:
            result = PlanResult(plan_pb.version, False, str(error), memory=self.engine.memory())
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

    def _forward(self, events, outbox: queue.Queue) -> None:
        """Budget changes go up at once, whatever the Welcome asked."""
        while not events.closed:
            event = events.next(timeout=1.0)
            if event is not None and event.event.kind == tpb.Event.KIND_BUDGET_CHANGED:
                change = ppb.BudgetChange(previous_budget_bytes=event.event.previous_budget_bytes,
                                          budget_bytes=event.event.budget_bytes, reason=event.event.message)
                outbox.put(ppb.ExecutorMessage(budget_change=change))

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


def _read_secret(path: Path | None) -> str:
    try:
        return path.read_text().strip() if path is not None and path.is_file() else ""
    except OSError as error:
        log.warning("cannot read the node secret %s (%s): registering without it", path, error.strerror)
        return ""


def _write_secret(path: Path, secret: str) -> None:
    """Owner-only, written atomically: a crash leaves the previous secret."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    tmp.replace(path)
