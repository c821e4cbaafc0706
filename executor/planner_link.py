"""The executor's dial-out stream to its planner.

The executor opens the connection (so a device behind NAT or a firewall still
works), registers, sends budget changes and memory telemetry up, and applies
the plans that come down, answering each with an ACK or a NACK. When the
planner is away the executor keeps its last good plan and keeps retrying;
each new connection starts with a fresh registration, which resyncs the planner.
The planner's first answer carries this node id's secret, sent back in every later
registration (and kept in the state directory, when there is one, across restarts):
it proves the executor is the one already connected under its node id.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.core.plan import PlanResult
from swapmoe.executor.engine import Engine
from swapmoe.executor.server import describe_pb
from swapmoe.rpc import convert, transport
from swapmoe.v1 import common_pb2, planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

log = logging.getLogger(__name__)
SECRET_FILE = "node_secret"


class PlannerLink:
    def __init__(self, engine: Engine, planner_address: str, executor_address: str = ""):
        self.engine = engine
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
            node_secret=self.node_secret,
        )

    def _session(self) -> None:
        outbox: queue.Queue = queue.Queue()
        outbox.put(ppb.ExecutorMessage(registration=self.registration()))
        hub = self.engine.hub
        events = hub.subscribe([tpb.TOPIC_EVENTS])
        forwarder = threading.Thread(target=self._forward, args=(events, outbox), daemon=True)
        with transport.channel(self.planner_address) as channel:
            self._call = planner_pb2_grpc.PlannerServiceStub(channel).Connect(_drain(outbox))
            forwarder.start()
            try:
                for message in self._call:
                    kind = message.WhichOneof("message")
                    if kind == "welcome":
                        self._keep_secret(message.welcome.node_secret)
                        self.connected.set()
                        log.info("connected to planner %s", self.planner_address)
                    elif kind == "plan":
                        outbox.put(ppb.ExecutorMessage(plan_result=self._apply(message.plan)))
            finally:
                hub.unsubscribe(events)
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

    def _forward(self, events, outbox: queue.Queue) -> None:
        """Budget changes go up at once; memory goes up every second."""
        while not events.closed:
            event = events.next(timeout=1.0)
            if event is not None and event.event.kind == tpb.Event.KIND_BUDGET_CHANGED:
                change = ppb.BudgetChange(previous_budget_bytes=event.event.previous_budget_bytes,
                                          budget_bytes=event.event.budget_bytes, reason=event.event.message)
                outbox.put(ppb.ExecutorMessage(budget_change=change))
            elif event is None and not events.closed:
                memory = convert.memory_to_pb(self.engine.memory())
                outbox.put(ppb.ExecutorMessage(telemetry=self.engine.hub.make(memory=memory)))


def _drain(outbox: queue.Queue):
    while (message := outbox.get()) is not None:
        yield message


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
