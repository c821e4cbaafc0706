"""The planner's memory of its executors on disk, so a restart loses no plan.

One JSON file per executor under ``DIR/executors/`` (named by a hash of the node id, which
may hold any printable character), rewritten atomically on every change: its registration,
the plan it should run (with why, and what the search predicted for it), the plan it
acknowledged, whether an operator pinned it, its highest version, the workload recognised and
the digest of its secret (never the secret). Device profiles and frontiers are kept beside
it by the planner (``DIR/profiles``, ``DIR/frontiers``). Protobuf parts are stored
as protobuf JSON and parsed by the one converter the services use. A file that does not
parse is set aside with a warning; the executor it described is replanned when it returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from google.protobuf import json_format

from swapmoe.core.errors import InvalidField
from swapmoe.core.limits import MAX_PLAN_VERSION, MAX_REASON_CHARS, check_range, check_text
from swapmoe.core.plan import validate_plan
from swapmoe.planner_service.registration import check_registration
from swapmoe.planner_service.records import ExecutorRecord
from swapmoe.planner_service.search import Found
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2, planner_pb2 as ppb

log = logging.getLogger(__name__)
FORMAT = 1


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
        self._interval = write_behind_s
        self._stop = threading.Event()
        self._writer = None
        if write_behind_s > 0:
            self._writer = threading.Thread(target=self._write_behind, daemon=True, name="planner-state")
            self._writer.start()

    def path(self, node_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(node_id.encode()).hexdigest()[:32]}.json"

    def save(self, record: ExecutorRecord) -> None:
        if self._writer is None:
            self._write(record)
        else:
            self._dirty[record.node_id] = record  # one dict store: safe from any thread

    def flush(self) -> None:
        """Write every record noted since the last flush. A record that changes while it is written
        was noted again after its change (the registry saves after every change), so the next
        flush writes it again."""
        while self._dirty:
            node_id = next(iter(self._dirty))
            self._write(self._dirty.pop(node_id))

    def close(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        self.flush()

    def _write_behind(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except OSError as error:  # a full disk: keep serving, say so, try again
                log.error("cannot write planner state under %s: %s", self.directory, error)

    def _write(self, record: ExecutorRecord) -> None:
        path = self.path(record.node_id)
        text = json.dumps(_to_json(record), separators=(",", ":"))
        with self._lock:  # one writer per file name at a time
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)

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
        "workload": record.workload,
        "reason": record.reason,
        "found": record.found.to_json() if record.found else None,
    }


def _registration_json(record: ExecutorRecord) -> dict:
    """The registration as JSON, cached: only its budget changes after it arrives."""
    cached = record.registration_json
    if cached is None or cached.get("budgetBytes", "0") != str(record.registration.budget_bytes):
        cached = record.registration_json = json_format.MessageToDict(record.registration)
    return cached


def _from_json(raw: dict) -> ExecutorRecord:
    if raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format')} is not {FORMAT}")
    registered = check_registration(json_format.ParseDict(raw["registration"], ppb.Registration()))
    if registered.registration.node_id != raw["node_id"]:
        raise ValueError("node_id does not match its registration")
    desired, acked = _plan(raw["desired"]), _plan(raw["acked"])
    for plan in (desired, acked):
        if plan is not None:
            validate_plan(plan, registered.memory.layout)
    check_range("version", int(raw["version"]), 0, MAX_PLAN_VERSION)
    found = Found.from_json(raw["found"]) if raw.get("found") else None
    workload = str(raw.get("workload", ""))
    check_text("workload", workload)
    return ExecutorRecord(raw["node_id"], registered.registration, registered.memory, connected=False,
                          desired=desired, acked=acked, state=int(raw["state"]), pinned=bool(raw["pinned"]),
                          version=int(raw["version"]), secret_digest=str(raw["secret_sha256"]),
                          workload=workload,
                          reason=str(raw.get("reason", ""))[:MAX_REASON_CHARS], found=found)
