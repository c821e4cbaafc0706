"""A Connect stream opened by hand, as an impostor or a hand-made executor would open one."""

from __future__ import annotations

import queue

from swapmoe.executor.engine import Engine
from swapmoe.executor.planner_link import PlannerLink
from swapmoe.rpc import security, transport
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc


class Stream:
    """A Connect stream opened by hand (an impostor, or a hand-made executor), kept open until closed."""

    def __init__(self, address: str, registration: ppb.Registration, client: security.ClientSecurity | None = None):
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(ppb.ExecutorMessage(registration=registration))
        stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(address, client))
        self.call = stub.Connect(iter(self._outbox.get, None), timeout=30)

    def first(self) -> ppb.PlannerMessage:
        return next(self.call)

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()


def claim(engine: Engine, node_id: str, secret: str = "", address: str = "") -> ppb.Registration:
    registration = PlannerLink(engine, "unused").registration()
    registration.node_id, registration.node_secret, registration.executor_address = node_id, secret, address
    return registration
