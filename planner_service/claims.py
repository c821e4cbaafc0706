"""Who may register under a node id, and how long the planner remembers one that went away.

Pure rules over ``ExecutorRecord``s; the registry applies them under its lock.

- A node id is claimed once: its first registration is issued a secret, and every later one,
  whether the node is connected or away, must carry it. A claim counts once the executor has
  answered on the stream that brought its secret (so it has it): a stream that broke before
  its Welcome arrived leaves an id that may be claimed again without one.
- A registration's plan may be at most ``MAX_VERSION_STEP`` versions ahead of the newest the
  planner issued that node: past that, the planner could send no plan after it.
- A record away longer than ``RegistrySettings.away_ttl_s`` expires, one that never
  acknowledged a plan after ``unplanned_ttl_s`` (registrations that never became executors).
  Away counts from the stream's end, or from the planner's start for a record it read back (a
  planner that stopped, or crashed, cannot tell which of its executors were connected).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Iterable

from swapmoe.core.errors import Forbidden, InvalidField
from swapmoe.core.limits import MAX_VERSION_STEP
from swapmoe.planner_service.records import ExecutorRecord, digest


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """How many executors the planner keeps, and for how long it remembers one that went away."""

    max_nodes: int = 100_000
    away_ttl_s: float = 7 * 24 * 3600.0  # an executor away this long is forgotten
    unplanned_ttl_s: float = 600.0  # ... or this long, if it never acknowledged a plan

    def __post_init__(self):
        if self.max_nodes < 1 or self.away_ttl_s <= 0 or self.unplanned_ttl_s <= 0:
            raise ValueError(f"registry settings: need max_nodes >= 1 and positive lifetimes, got {self}")


def admit(old: ExecutorRecord | None, secret: str) -> str:
    """The secret for a registration of ``old``'s node id: the one it proved, or a new one. Raises
    Forbidden for a node id whose stream is open or whose claim was confirmed, unless the
    registration carries that node's secret."""
    proved = old is not None and bool(secret) and hmac.compare_digest(digest(secret), old.secret_digest)
    if old is not None and old.connected and not proved:
        raise Forbidden(f"registration.node_id: {old.node_id!r} is connected on another stream; only a "
                        f"registration carrying that executor's node_secret may take it over")
    if old is not None and old.claimed and not proved:
        raise Forbidden(f"registration.node_secret: node id {old.node_id!r} belongs to an executor this planner "
                        f"issued a secret to, and this registration does not carry it (the executor keeps it in "
                        f"its --state-dir). If that executor lost its state for good, an operator can release "
                        f"the id: swapmoe planner forget {old.node_id}")
    return secret if proved else secrets.token_urlsafe(32)


def check_version_step(running: int, issued: int) -> None:
    """Refuse a registration whose plan is more versions ahead of what this planner issued than one
    push may jump: a version near the end of the range would leave no version to send it next."""
    if running > issued + MAX_VERSION_STEP:
        raise InvalidField("registration.current_plan.version",
                           f"{running} is more than {MAX_VERSION_STEP} past the newest version this planner issued "
                           f"this node ({issued}); no plan could be sent after it. Remove the executor's saved plan "
                           f"(plan.json in its --state-dir) and restart it")


def expired(records: Iterable[ExecutorRecord], now_ns: int, settings: RegistrySettings) -> list[ExecutorRecord]:
    """The records away past their lifetime at ``now_ns``."""
    gone = []
    for record in records:
        ttl = settings.away_ttl_s if record.acked is not None else settings.unplanned_ttl_s
        if not record.connected and now_ns - record.away_since_ns > ttl * 1e9:
            gone.append(record)
    return gone
