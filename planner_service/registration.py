"""What an executor's messages must satisfy before the planner acts on them, and what of them
the planner can verify.

Every check here runs on the stream's own thread before the registry's lock is taken, so a
hostile registration (2^32 experts, a budget of 2^64 bytes, a plan version of 2^64) costs
one bounded check and an INVALID_ARGUMENT, never a wedged planner. The address clients will
use to reach an executor is not taken from what it asserts: ``published_address`` keeps its
port and takes the host from what the planner saw (``Peer``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from swapmoe.core import limits
from swapmoe.core.budget import MemoryModel
from swapmoe.core.errors import InvalidField
from swapmoe.core.labels import check_labels
from swapmoe.core.layout import validate_layout
from swapmoe.core.plan import Plan, validate_plan
from swapmoe.rpc import convert
from swapmoe.rpc.tls import host_of, peer_ip
from swapmoe.v1 import common_pb2, planner_pb2 as ppb


@dataclass(frozen=True, slots=True)
class Registered:
    """A checked registration: the memory model its plans are sized with and the plan it runs
    (None for a registration that carries no plan)."""

    registration: ppb.Registration
    memory: MemoryModel
    current: Plan | None


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a Connect stream, as the transport saw it: the IP address the
    stream came from (None: not an IP connection), and the names of the client certificate it
    presented (None: no certificate, so no mutual TLS)."""

    ip: str | None = None
    certificate_names: frozenset[str] | None = None

    @classmethod
    def from_grpc(cls, peer: str, auth_context: dict) -> "Peer":
        """From ``context.peer()`` (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``) and ``context.auth_context()``."""
        names = auth_context.get("x509_subject_alternative_name")
        return cls(peer_ip(peer), frozenset(n.decode(errors="replace").lower() for n in names) if names else None)


def published_address(asserted: str, peer: Peer) -> tuple[str, str]:
    """The address the planner publishes for an executor that asserts ``asserted``: its port, with
    a host the planner verified. With a client certificate the host must be one of its names (a
    wildcard bind, 0.0.0.0 or ::, becomes the stream's IP, which must be one too); without one,
    the host is the IP the stream came from. Returns the address and, when the asserted one could
    not be verified, why: then the address is "" (the executor is planned for, but no client is
    sent to it). "" too when the executor gave no address."""
    if not asserted:
        return "", ""
    host, port = _split_address(asserted)
    if peer.certificate_names is not None:
        if _wildcard(host):
            host = peer.ip or ""
        if _canonical(host) not in {_canonical(n) for n in peer.certificate_names}:
            return "", (f"{host or asserted!r} is not a name in the executor's client certificate "
                        f"({', '.join(sorted(peer.certificate_names))}), so clients could not verify that server: "
                        f"it is not published (start the executor with --advertise-host set to one of those names)")
        return _join(host, port), ""
    if not peer.ip:
        return "", "the stream came from no IP address to publish"
    return _join(peer.ip, port), ""


def _split_address(address: str) -> tuple[str, int]:
    _, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidField("registration.executor_address", f"{address!r} is not host:port with a port of 1 to 65535")
    return host_of(address), int(port)


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "*")


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        return host.lower().rstrip(".")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_registration(reg: ppb.Registration) -> Registered:
    """Raise InvalidField (naming ``registration.<field>``) unless every field is within bounds."""
    limits.check_node_id("registration.node_id", reg.node_id)
    limits.check_fingerprint("registration.model_fingerprint", reg.model_fingerprint)
    limits.check_text("registration.node_secret", reg.node_secret)
    limits.check_text("registration.executor_address", reg.executor_address)
    check_labels("registration.labels", reg.labels)
    for name in ("kind", "name", "hostname"):
        limits.check_text(f"registration.device.{name}", getattr(reg.device, name))
    limits.check_range("registration.device.memory_bytes", reg.device.memory_bytes, 0, limits.MAX_BYTES)
    for name in ("staging_bytes", "kv_cache_bytes", "activation_bytes", "batch_bytes", "runtime_bytes"):
        limits.check_range(f"registration.reserve.{name}", getattr(reg.reserve, name), 0, limits.MAX_BYTES)
    limits.check_count("registration.layout.layers", reg.layout.layers, limits.MAX_LAYERS)
    layout = convert.layout_from_pb(reg.layout)
    try:
        validate_layout(layout)
        memory = MemoryModel(layout, convert.reserve_from_pb(reg.reserve), reg.device.memory_bytes)
        memory.check_budget(reg.budget_bytes)
        current = convert.plan_from_pb(reg.current_plan) if reg.HasField("current_plan") else None
        if current is not None:
            validate_plan(current, layout)
    except InvalidField as error:
        raise error.under("registration") from None
    return Registered(reg, memory, current)


def check_budget_change(memory: MemoryModel, change: ppb.BudgetChange) -> None:
    try:
        memory.check_budget(change.budget_bytes)
    except InvalidField as error:
        raise error.under("budget_change") from None
    limits.check_text("budget_change.reason", change.reason, limits.MAX_REASON_CHARS)


def check_result(result: common_pb2.PlanResult) -> None:
    limits.check_range("plan_result.plan_version", result.plan_version, 0, limits.MAX_PLAN_VERSION)
    limits.check_text("plan_result.reason", result.reason, limits.MAX_REASON_CHARS)
    limits.check_count("plan_result.achieved_experts_per_layer", result.achieved_experts_per_layer,
                       limits.MAX_LAYERS)
