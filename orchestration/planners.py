"""The control node's side of its planners: a channel each, statuses read page by page,
pushes, and calls fanned out to every planner at once.

How a fleet shards past one planner: each executor dials one planner (chosen by the
deployment: a hash or range of node ids, a region or device-class label; ``swapmoe fleet up``
hashes node ids), so each planner holds a disjoint shard of the fleet's executors. The control
node knows every planner by address and fans out: a listing or a target search asks each
planner for its own executors, a wave sends one push to each planner that has nodes in it, and
answers are added up. A planner that does not answer leaves its shard out of a listing (named
in it); its nodes in a rollout count as unreachable.
"""

from __future__ import annotations

import base64
import threading
from concurrent import futures
from typing import Callable, Iterable, TypeVar

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.core.labels import MAX_PAGE, MAX_SELECTOR_CHARS, check_page_size, parse_selector
from swapmoe.rpc import transport
from swapmoe.v1 import fleet_pb2 as fpb, planner_pb2 as ppb, planner_pb2_grpc

PLANNER_TIMEOUT_S = 10
T = TypeVar("T")


class Planners:
    """The planners a control node fans out to, by address (one channel each, opened on first
    use, so a rollout kept on disk still reaches a planner dropped from the command line)."""

    def __init__(self, addresses: Iterable[str], timeout_s: float = PLANNER_TIMEOUT_S, security=None):
        self.addresses = list(dict.fromkeys(addresses))
        self.timeout_s, self.security = timeout_s, security  # security: an rpc.security.ClientSecurity
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, planner_pb2_grpc.PlannerServiceStub] = {}
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=min(32, max(4, len(self.addresses))),
                                                thread_name_prefix="planners")

    def stub(self, address: str) -> planner_pb2_grpc.PlannerServiceStub:
        with self._lock:
            if address not in self._stubs:
                self._channels[address] = transport.channel(address, self.security)
                self._stubs[address] = planner_pb2_grpc.PlannerServiceStub(self._channels[address])
            return self._stubs[address]

    def status_page(self, address: str, request: ppb.PlanStatusRequest) -> ppb.PlanStatusResponse:
        return self.stub(address).GetPlanStatus(request, timeout=self.timeout_s)

    def statuses(self, address: str, node_ids: Iterable[str] = (), selector: str = "", connected_only: bool = False,
                 view: int = ppb.STATUS_VIEW_BRIEF, states: Iterable[int] = ()) -> list[ppb.ExecutorStatus]:
        """Every executor of one planner that matches, page after page, in node id order. The
        filters are applied here too, so a planner that ignores them answers the same."""
        wanted = set(node_ids)
        match = parse_selector(selector).matches
        states = set(states)
        request = ppb.PlanStatusRequest(node_ids=sorted(wanted), selector=selector, page_size=MAX_PAGE, view=view,
                                        connected_only=connected_only, states=sorted(states))
        found, tokens = [], set()
        while True:
            response = self.status_page(address, request)
            found += [s for s in response.executors if (not wanted or s.node_id in wanted) and match(s.labels)
                      and (s.connected or not connected_only) and (not states or s.state in states)]
            if not response.next_page_token or response.next_page_token in tokens:
                return found
            tokens.add(response.next_page_token)
            request.page_token = response.next_page_token

    def push(self, address: str, request: ppb.PushPlanRequest) -> ppb.PushPlanResponse:
        return self.stub(address).PushPlan(request, timeout=self.timeout_s)

    def each(self, call: Callable[[str], T], addresses: Iterable[str] | None = None) -> dict[str, T | grpc.RpcError]:
        """``call(address)`` for every planner (or those given) at once; a failed call's RpcError
        stands in its result."""
        addresses = list(self.addresses if addresses is None else addresses)
        pending = {address: self._pool.submit(call, address) for address in addresses}
        results = {}
        for address, future in pending.items():
            try:
                results[address] = future.result()
            except grpc.RpcError as error:
                results[address] = error
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()


def list_nodes(planners: Planners, request: fpb.ListNodesRequest) -> fpb.ListNodesResponse:
    """One page of executors across planners: planner by planner, node ids in order (a page
    ends where a planner's shard ends). The summary adds every planner's counts up."""
    match = parse_selector(request.selector).matches
    size = check_page_size("page_size", request.page_size)
    start, token = _cursor(request.page_token, len(planners.addresses))
    response = fpb.ListNodesResponse()

    def ask(address: str, page_token: str = "", page_size: int = 1) -> ppb.PlanStatusResponse:
        return planners.status_page(address, ppb.PlanStatusRequest(
            selector=request.selector, page_size=page_size, page_token=page_token, view=request.view,
            connected_only=request.connected_only))

    # Every planner at once: the one the page starts at for its page, the others for their counts.
    answers = planners.each(lambda a: ask(a, token, size) if a == planners.addresses[start] else ask(a))
    for i, address in enumerate(planners.addresses):
        answer = answers[address]
        if isinstance(answer, grpc.RpcError):
            if answer.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise answer  # the request's fault (a page token, a selector), not the planner's
            response.unreachable_planners.append(address)
            continue
        for name in ("total", "connected", "pending", "acked", "nacked", "unplanned", "pinned"):
            setattr(response.summary, name, getattr(response.summary, name) + getattr(answer.summary, name))
        if i < start or response.nodes or response.next_page_token:
            continue
        if i > start:  # the page starts past a shard that had nothing (more) to list
            try:
                answer = ask(address, "", size)
            except grpc.RpcError:
                response.unreachable_planners.append(address)
                continue
        response.nodes.extend(fpb.FleetNode(planner=address, status=s) for s in answer.executors
                              if match(s.labels) and (s.connected or not request.connected_only))
        if answer.next_page_token:
            response.next_page_token = _token(i, answer.next_page_token)
        elif i + 1 < len(planners.addresses):
            response.next_page_token = _token(i + 1, "") if response.nodes else ""
    return response


def _token(index: int, planner_token: str) -> str:
    return base64.urlsafe_b64encode(f"{index}:{planner_token}".encode()).decode()


def _cursor(token: str, planners: int) -> tuple[int, str]:
    """The planner a page starts at and that planner's own page token."""
    if not token:
        return 0, ""
    try:
        index, _, planner_token = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        index = int(index)
    except (ValueError, UnicodeDecodeError):
        raise InvalidField("page_token", "is not a token this control node gave out") from None
    if not 0 <= index < planners or len(planner_token) > 4 * MAX_SELECTOR_CHARS:
        raise InvalidField("page_token", "is not a token this control node gave out (or its planners changed)")
    return index, planner_token


def describe_error(address: str, error: grpc.RpcError) -> str:
    """One line for an operator: which planner, what status, why."""
    code = error.code().name if hasattr(error, "code") else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    return f"planner {address}: {code}: {details}"
