"""The planner's memory of its executors on disk, so a restart loses no plan.

One SQLite database, ``DIR/planner.db`` (WAL journal, ``synchronous=NORMAL``), with a row per
executor keyed by its node id (which may hold any printable character). The row holds its
registration, the plan it should run (with why, and what the search predicted for it), the plan
it acknowledged, whether an operator pinned it, its highest version, the workload recognised,
the digest of its secret (never the secret), whether its claim was confirmed and when it was
last seen, as one JSON object. Device profiles and frontiers are kept beside it by the planner
(``DIR/profiles``, ``DIR/frontiers``). Protobuf parts are stored as protobuf JSON and parsed by
the one converter the services use. A row that does not parse, or holds a value of the wrong
type or out of range, is moved to the ``quarantine`` table with a warning; the executor it
described is replanned when it returns. ``save`` only notes a copy of the record (the registry
calls it under its lock); a thread writes what changed, one transaction per pass. A write that
fails (a full disk) is never fatal: the record stays noted, is written again at the next chance,
and ``health`` says how many wait and why (the status RPC shows it). A planner that kept one
JSON file per executor (``DIR/executors/*.json``) has them imported once, then moved to
``DIR/executors.migrated/``. A ``planner.db`` that is not this planner's (another program's
database, another schema version, not a database) is refused, naming ``state_dir``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
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
FORMAT = 1  # of one record's JSON
SCHEMA = 1  # of the database (its user_version)
APPLICATION_ID = 0x53574D50  # "SWMP" in the database header: this file is a SwapMoE planner's
RETRY_S = 1.0  # after a failed write, the next pass waits this long
_TABLES = """
CREATE TABLE executors (node_id TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE quarantine (node_id TEXT, record, why TEXT NOT NULL, set_aside_ns INTEGER NOT NULL);
"""


class PlannerState:
    """``save`` notes a copy of the record and wakes a thread that writes what changed: at once
    by default, or every ``write_behind_s`` seconds (a fleet-wide rollout changes every record
    twice within a second: coalesced into one transaction, off the streams' path). ``close``
    writes what is left."""

    def __init__(self, directory: Path, write_behind_s: float = 0.0):
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise InvalidField("state_dir", f"{directory} is not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidField("state_dir", f"cannot create {directory}: {error.strerror}") from error
        self.path = directory / "planner.db"
        self._db = _open(self.path, directory / "executors")
        self._lock = threading.Lock()  # guards the notes below; never held while the database is written
        self._writing = threading.Lock()  # one pass (or load) on the database at a time
        self._dirty: dict[str, ExecutorRecord] = {}
        self._erased: set[str] = set()
        self._failed: dict[str, ExecutorRecord] = {}  # writes that failed, written again at the next chance
        self._retry_at = 0.0  # monotonic time before which a pass after a failure does not start
        self._registrations: dict[str, tuple] = {}  # node id -> (registration, budget, its JSON): the cache
        self.error = ""  # why the last write failed, "" once every record is written
        self._interval = write_behind_s
        self._wake, self._stop = threading.Event(), threading.Event()
        self._writer = threading.Thread(target=self._write_behind, daemon=True, name="planner-state")
        self._writer.start()

    def save(self, record: ExecutorRecord) -> None:
        """Note a copy of ``record`` for the writer; no I/O here, and never raises for a failed
        write: it is retried. The copy is shallow: the plans, prediction and memory model are
        frozen, and a record's registration is replaced, never changed in place."""
        with self._lock:
            self._dirty[record.node_id] = _snapshot(record)
        if not self._wake.is_set():  # set() takes a lock and notifies: once per pass is enough
            self._wake.set()

    def erase(self, node_id: str) -> None:
        """Forget ``node_id``'s record on disk (a write noted for it is dropped)."""
        with self._lock:
            self._dirty.pop(node_id, None)
            self._failed.pop(node_id, None)
            self._erased.add(node_id)
        self._wake.set()

    def health(self) -> tuple[int, str]:
        """Records not on disk because writing failed, and why (0 and "" when every record is)."""
        with self._lock:
            if not self._failed:
                return 0, ""
            return len(self._failed.keys() | self._dirty.keys()), self.error

    def flush(self) -> None:
        """Write every record noted (and erase every one forgotten) since the last pass, in one
        transaction. A record that changes while it is written was noted again after its change,
        so the next pass writes it again. A pass that fails (a full disk) writes nothing: its
        records wait for the next pass at least ``RETRY_S`` later."""
        with self._writing:
            with self._lock:
                if self._failed and time.monotonic() < self._retry_at:
                    return
                batch, self._dirty = {**self._failed, **self._dirty}, {}
                erased, self._erased = self._erased, set()
            if not batch and not erased:
                return
            try:
                self._write(batch, erased)
            except (sqlite3.Error, OSError, MemoryError) as error:
                self._failed_pass(batch, erased, error)
                return
            with self._lock:
                for node_id in batch:
                    self._failed.pop(node_id, None)
                if not self._failed:
                    self.error = ""

    def close(self) -> None:
        """Stop the writer and write what is left, failed writes included (their wait is cut short)."""
        self._stop.set()
        self._wake.set()
        self._writer.join(timeout=30)
        self._retry_at = 0.0
        self.flush()
        unsaved, why = self.health()
        if unsaved:
            log.error("planner state: %d records not written at stop (%s)", unsaved, why)
        with self._writing:
            self._db.close()

    def _write_behind(self) -> None:
        while True:
            self._wake.wait(RETRY_S if self._failed else None)
            if self._interval > 0:
                self._stop.wait(self._interval)  # coalesce what changes meanwhile
            self._wake.clear()
            if self._stop.is_set():
                return  # close writes the rest
            self.flush()

    def _failed_pass(self, batch: dict[str, ExecutorRecord], erased: set[str], error: Exception) -> None:
        with self._lock:
            if not self._failed or self.error != str(error):
                log.error("cannot write planner state %s: %s (%d records kept in memory, written again later)",
                          self.path, error, len(batch))
            for node_id, record in batch.items():
                if node_id not in self._erased:  # forgotten meanwhile: not written back
                    self._failed[node_id] = record
            self._erased |= erased
            self.error = str(error) or type(error).__name__
            self._retry_at = time.monotonic() + RETRY_S

    def _write(self, batch: dict[str, ExecutorRecord], erased: set[str]) -> None:
        """One transaction: the erasures first, then the records (a record noted after its
        erasure is in both). Not synced per pass (``synchronous=NORMAL``): a power cut loses at
        most the last passes, never a consistent database."""
        for node_id in erased:
            self._registrations.pop(node_id, None)
        rows = [(node_id, json.dumps(self._to_json(record), separators=(",", ":")))
                for node_id, record in batch.items()]
        with self._db:  # commits, or rolls back and raises
            self._db.executemany("DELETE FROM executors WHERE node_id = ?", [(n,) for n in erased])
            self._db.executemany("INSERT OR REPLACE INTO executors (node_id, record) VALUES (?, ?)", rows)

    def load(self) -> list[ExecutorRecord]:
        """Every executor saved, disconnected; a row that does not read back is moved to the
        ``quarantine`` table with a warning naming its node id, and skipped."""
        records, bad = [], []
        with self._writing:
            for node_id, text in self._db.execute("SELECT node_id, record FROM executors ORDER BY node_id"):
                try:
                    record = _from_json(json.loads(text))
                    if record.node_id != node_id:
                        raise ValueError(f"node_id {record.node_id!r} is not the row's")
                    records.append(record)
                except (ValueError, KeyError, TypeError, json_format.ParseError) as error:
                    log.warning("ignoring planner state of %r (%s); moved to the quarantine table", node_id, error)
                    bad.append((node_id, text, str(error), time.time_ns()))
            if bad:
                try:
                    with self._db:
                        self._db.executemany("INSERT INTO quarantine VALUES (?, ?, ?, ?)", bad)
                        self._db.executemany("DELETE FROM executors WHERE node_id = ?", [(b[0],) for b in bad])
                except sqlite3.Error as error:  # read-only or full: skipped now, set aside next time
                    log.error("cannot set aside %d planner state rows in %s: %s", len(bad), self.path, error)
        return records

    def _to_json(self, record: ExecutorRecord) -> dict:
        return {
            "format": FORMAT,
            "node_id": record.node_id,
            "registration": self._registration_json(record),
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

    def _registration_json(self, record: ExecutorRecord) -> dict:
        """The registration as JSON with the budget in force, cached per node: after it arrives
        only the budget changes (a new registration is a new message)."""
        cached = self._registrations.get(record.node_id)
        if cached is None or cached[0] is not record.registration or cached[1] != record.budget_bytes:
            raw = json_format.MessageToDict(record.registration)
            raw["budgetBytes"] = str(record.budget_bytes)  # int64 in protobuf JSON: a string
            cached = self._registrations[record.node_id] = (record.registration, record.budget_bytes, raw)
        return cached[2]


def _open(path: Path, json_dir: Path) -> sqlite3.Connection:
    """The planner's database at ``path``, created (importing ``json_dir``'s files) when new;
    InvalidField naming ``state_dir`` when it cannot be opened or is not this planner's."""
    try:
        # Written by the writer thread, read at start: one at a time (PlannerState._writing).
        db = sqlite3.connect(path, isolation_level="IMMEDIATE", check_same_thread=False)
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        schema = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error as error:
        raise InvalidField("state_dir", f"{path} is not a SwapMoE planner database: {error}") from error
    if application_id == 0 and tables == 0:
        _create(db, path, json_dir)
    elif application_id != APPLICATION_ID:
        db.close()
        raise InvalidField("state_dir", f"{path} is not a SwapMoE planner database (application_id {application_id})")
    elif schema != SCHEMA:
        db.close()
        raise InvalidField("state_dir", f"{path} has planner schema {schema}; this planner reads schema {SCHEMA}")
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        log.warning("planner state %s: journal mode %s (WAL not available here)", path, mode)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _create(db: sqlite3.Connection, path: Path, json_dir: Path) -> None:
    """Make the tables, importing a JSON store's files in the same transaction (a file that does
    not parse goes to ``quarantine``; ``load`` checks the rest); then move the files aside."""
    rows, bad = [], []
    for file in sorted(json_dir.glob("*.json")) if json_dir.is_dir() else []:
        text = None
        try:
            text = file.read_text()
            node_id = json.loads(text)["node_id"]
            if type(node_id) is not str:  # noqa: E721 - exactly a string
                raise TypeError(f"node_id {node_id!r} is not a str")
            rows.append((node_id, text))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring planner state file %s (%s); moved to the quarantine table", file, error)
            bad.append((None, text, f"{file.name}: {error}", time.time_ns()))
    try:
        db.execute("BEGIN IMMEDIATE")
        for statement in filter(str.strip, _TABLES.split(";")):
            db.execute(statement)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA}")
        db.executemany("INSERT OR REPLACE INTO executors (node_id, record) VALUES (?, ?)", rows)
        db.executemany("INSERT INTO quarantine VALUES (?, ?, ?, ?)", bad)
        db.execute("COMMIT")
    except sqlite3.Error as error:
        db.close()
        raise InvalidField("state_dir", f"cannot create {path}: {error}") from error
    if rows or bad:
        moved = json_dir.with_name("executors.migrated")
        try:
            json_dir.rename(moved)
        except OSError as error:
            moved = f"left in {json_dir} ({error.strerror}; not imported again)"
        log.info("planner state: imported %d executors (%d unreadable) from %s into %s; the files: %s",
                 len(rows), len(bad), json_dir, path, moved)


def _snapshot(record: ExecutorRecord) -> ExecutorRecord:
    """A shallow copy of ``record`` (its fields as they are now), about three times cheaper than
    ``copy.copy``: it runs under the registry's lock."""
    snapshot = object.__new__(ExecutorRecord)
    snapshot.__dict__.update(record.__dict__)
    return snapshot


def _plan_json(plan) -> dict | None:
    return None if plan is None else json_format.MessageToDict(convert.plan_to_pb(plan))


def _plan(raw: dict | None):
    return None if raw is None else convert.plan_from_pb(json_format.ParseDict(raw, common_pb2.Plan()))


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
