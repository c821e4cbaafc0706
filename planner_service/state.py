"""The planner's memory of its executors on disk, so a restart loses no plan.

One JSON file per executor under ``DIR/executors/`` (named by a hash of the node id, which
may hold any printable character), rewritten atomically on every change: its registration,
the plan it should run (with why, and what the search predicted for it), the plan it
acknowledged, whether an operator pinned it, its highest version, the workload recognised,
the digest of its secret (never the secret), whether its claim was confirmed and when it was
last seen. Device profiles and frontiers are kept beside it by the planner (``DIR/profiles``,
``DIR/frontiers``). Protobuf parts are stored as protobuf JSON and parsed by the one
converter the services use. A file that does not parse, or holds a value of the wrong type
or out of range, is set aside with a warning; the executor it described is replanned when it
returns. A write that fails (a full disk) is never fatal: the record stays noted, is written
again at the next chance, and ``health`` says how many wait and why (the status RPC shows it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from google.protobuf import json_format

from swapmoe.core.errors import InvalidField
from swapmoe.core.files import write_atomically
from swapmoe.core.limits import MAX_PLAN_VERSION, MAX_REASON_CHARS, check_range, check_text
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.registration import check_registration
from swapmoe.planner_service.records import ExecutorRecord
from swapmoe.planner_service.search import Found
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, planner_pb2 as ppb

log = logging.getLogger(__name__)
FORMAT = 1
RETRY_S = 1.0  # after a failed write, the next pass waits this long


class PlannerState:
    """``save`` writes at once; with ``write_behind_s`` it only notes the record, and a thread writes
    what changed every ``write_behind_s`` seconds (a fleet-wide rollout changes every record twice
    within a second: coalesced, off the streams' path). ``close`` writes what is left."""

    def __init__(self, directory: Path, write_behind_s: float = 0.0):
        self.directory = Path(directory) / "executors"
        if self.directory.parent.exists() and not self.directory.parent.is_dir():
            raise InvalidField("state_dir", f"{self.directory.parent} is not a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidField("state_dir", f"cannot create {self.directory}: {error.strerror}") from error
        self._lock = threading.Lock()
        self._dirty: dict[str, ExecutorRecord] = {}
        self._failed: dict[str, ExecutorRecord] = {}  # writes that failed, written again at the next chance
        self._retry_at = 0.0  # monotonic time before which a pass after a failure does not start
        self.error = ""  # why the last write failed, "" once every record is written
        self._interval = write_behind_s
        self._stop = threading.Event()
        self._writer = None
        if write_behind_s > 0:
            self._writer = threading.Thread(target=self._write_behind, daemon=True, name="planner-state")
            self._writer.start()

    def path(self, node_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(node_id.encode()).hexdigest()[:32]}.json"

    def save(self, record: ExecutorRecord) -> None:
        """Write ``record`` (now, or behind); never raises for a failed write: it is retried."""
        with self._lock:
            self._dirty[record.node_id] = record
        if self._writer is None:
            self.flush()

    def erase(self, node_id: str) -> None:
        """Forget ``node_id``'s record on disk (a write noted for it is dropped)."""
        with self._lock:  # the writer holds it while it writes: an erased record is never written back
            self._dirty.pop(node_id, None)
            self._failed.pop(node_id, None)
            self.path(node_id).unlink(missing_ok=True)

    def health(self) -> tuple[int, str]:
        """Records not on disk because writing failed, and why (0 and "" when every record is)."""
        with self._lock:
            if not self._failed:
                return 0, ""
            return len(self._failed) + len(self._dirty), self.error

    def flush(self) -> None:
        """Write every record noted since the last flush. A record that changes while it is written
        was noted again after its change (the registry saves after every change), so the next
        flush writes it again. A write that fails (a full disk) ends the pass: its record and the
        rest wait for the next pass at least ``RETRY_S`` later, so a full disk costs one failed
        write per pass, not one per record."""
        with self._lock:
            if self._failed and time.monotonic() < self._retry_at:
                return
            for node_id, record in self._failed.items():
                self._dirty.setdefault(node_id, record)
        while True:
            with self._lock:  # per record: erase and save never wait for a whole pass
                if not self._dirty:
                    return
                node_id, record = next(iter(self._dirty.items()))
                del self._dirty[node_id]
                try:
                    self._write(record)
                except OSError as error:
                    if not self._failed or self.error != str(error):
                        log.error("cannot write planner state %s: %s (kept in memory, written again later)",
                                  self.path(node_id).name, error)
                    self._failed[node_id], self.error = record, str(error)
                    self._retry_at = time.monotonic() + RETRY_S
                    return
                self._failed.pop(node_id, None)

    def close(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self.flush()

    def _write_behind(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def _write(self, record: ExecutorRecord) -> None:
        """Caller holds the lock. Not synced: a record torn by a power cut is set aside at the next
        start and its executor replanned when it returns."""
        text = json.dumps(_to_json(record), separators=(",", ":"))
        write_atomically(self.path(record.node_id), text.encode(), sync=False)

    def load(self) -> list[ExecutorRecord]:
        """Every executor saved, disconnected; unreadable files are renamed ``*.bad`` and skipped."""
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(_from_json(json.loads(path.read_text())))
            except (ValueError, KeyError, TypeError, OSError, json_format.ParseError) as error:
                log.warning("ignoring planner state %s (%s); setting it aside as %s.bad", path, error, path.name)
                path.replace(path.with_suffix(".bad"))
        return records


def _plan_json(plan) -> dict | None:
    return None if plan is None else json_format.MessageToDict(convert.plan_to_pb(plan))


def _plan(raw: dict | None):
    return None if raw is None else convert.plan_from_pb(json_format.ParseDict(raw, common_pb2.Plan()))


def _to_json(record: ExecutorRecord) -> dict:
    return {
        "format": FORMAT,
        "node_id": record.node_id,
        "registration": _registration_json(record),
        "desired": _plan_json(record.desired),
        "acked": _plan_json(record.acked),
        "state": int(record.state),
        "pinned": record.pinned,
        "version": record.version,
        "secret_sha256": record.secret_digest,
        "claimed": record.claimed,
        "last_seen_ns": record.last_seen_ns,
        "workload": record.workload,
        "reason": record.reason,
        "found": record.found.to_json() if record.found else None,
    }


def _registration_json(record: ExecutorRecord) -> dict:
    """The registration as JSON with the budget in force, cached: only the budget changes after it arrives."""
    cached = record.registration_json
    if cached is None or cached.get("budgetBytes", "0") != str(record.budget_bytes):
        cached = json_format.MessageToDict(record.registration)
        cached["budgetBytes"] = str(record.budget_bytes)  # int64 in protobuf JSON: a string
        record.registration_json = cached
    return cached


_STATES = frozenset(ppb.PlanState.values())


def _typed(raw: dict, key: str, kind: type, default=None):
    """``raw[key]``, refused unless it is exactly of ``kind`` (a bool is no int, a string no bool)."""
    value = raw.get(key, default)
    if type(value) is not kind:  # noqa: E721 - bool is a subclass of int: the type itself is meant
        raise ValueError(f"{key}: {value!r} is not a {kind.__name__}")
    return value


def _from_json(raw: dict) -> ExecutorRecord:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format') if isinstance(raw, dict) else raw!r} is not {FORMAT}")
    registered = check_registration(json_format.ParseDict(raw["registration"], ppb.Registration()))
    node_id = _typed(raw, "node_id", str)
    if registered.registration.node_id != node_id:
        raise ValueError("node_id does not match its registration")
    desired, acked = _plan(raw["desired"]), _plan(raw["acked"])
    for plan in (desired, acked):
        if plan is not None:
            validate_plan(plan, registered.memory.layout)
    version = _typed(raw, "version", int)
    check_range("version", version, 0, MAX_PLAN_VERSION)
    state = _typed(raw, "state", int)
    if state not in _STATES:
        raise ValueError(f"state: {state} is not a plan state")
    secret = _typed(raw, "secret_sha256", str)
    if len(secret) != 64 or secret.strip("0123456789abcdef"):
        raise ValueError("secret_sha256: not a SHA-256 in hex")
    found = Found.from_json(raw["found"]) if raw.get("found") is not None else None
    workload = _typed(raw, "workload", str, "")
    check_text("workload", workload)
    reason = _typed(raw, "reason", str, "")
    check_text("reason", reason, MAX_REASON_CHARS)
    last_seen = _typed(raw, "last_seen_ns", int, 0)
    return ExecutorRecord(node_id, registered.registration, registered.memory, connected=False,
                          desired=desired, acked=acked, state=state, pinned=_typed(raw, "pinned", bool),
                          version=version, secret_digest=secret, claimed=_typed(raw, "claimed", bool, True),
                          last_seen_ns=last_seen, workload=workload, reason=reason, found=found)
