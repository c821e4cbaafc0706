"""The planner's records on disk (one SQLite database): a record that holds a wrong value is set
aside, never read as something else; a write that fails (a full disk) is kept, reported by the
status RPC and written again once it can be, never fatal to a stream; ``save`` does no I/O on the
caller's thread; a JSON store is imported once; a database that is not the planner's is refused."""

from __future__ import annotations

import json
import sqlite3
import threading

import grpc
import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.core.files import write_atomically
from swapmoe.core.plan import Plan
from swapmoe.planner_service.records import ExecutorRecord, digest
from swapmoe.planner_service.registration import check_registration
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve
from swapmoe.planner_service.state import PlannerState
from swapmoe.rpc import transport
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until
from planner_streams import Stream, claim

# One field of a saved record changed to a value of the wrong type or out of range.
CORRUPTIONS = {
    "state out of range": {"state": 99},
    "pinned as text": {"pinned": "no"},
    "pinned as a number": {"pinned": 1},
    "secret digest null": {"secret_sha256": None},
    "secret digest not hex": {"secret_sha256": "z" * 64},
    "secret digest short": {"secret_sha256": "ab"},
    "version as text": {"version": "5"},
    "version as a bool": {"version": True},
    "version negative": {"version": -1},
    "node id a number": {"node_id": 5},
    "workload a number": {"workload": 7},
    "reason a list": {"reason": ["why"]},
    "claimed as text": {"claimed": "yes"},
    "last seen as text": {"last_seen_ns": "yesterday"},
    "format from the future": {"format": 2},
    "state a float": {"state": 2.0},
}


def rows(directory, table="executors") -> dict:
    """``table``'s rows in the planner's database: node id -> record text."""
    with sqlite3.connect(directory / "planner.db") as db:
        return dict(db.execute(f"SELECT node_id, record FROM {table}"))


def block_writes(directory) -> None:
    """Every write of a record fails from now on, as on a full disk, until ``unblock_writes``."""
    PlannerState(directory).close()  # the database exists
    with sqlite3.connect(directory / "planner.db") as db:
        for event in ("INSERT", "UPDATE"):
            db.execute(f"CREATE TRIGGER full_{event} BEFORE {event} ON executors "
                       "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")


def unblock_writes(directory) -> None:
    with sqlite3.connect(directory / "planner.db") as db:
        db.execute("DROP TRIGGER full_INSERT")
        db.execute("DROP TRIGGER full_UPDATE")


@pytest.fixture
def saved(owner, tmp_path):
    """The directory of a planner that saved one record (node ``owner``), and that record's JSON."""
    planner, registry = serve(state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    stream = Stream(f"127.0.0.1:{planner.port}", claim(owner, "owner", address="127.0.0.1:1"))
    stream.first()
    stream.close()
    planner.stop(0)
    return tmp_path, json.loads(rows(tmp_path)["owner"])


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_record_holding_a_wrong_value_is_set_aside_not_misread(saved, corruption):
    directory, raw = saved
    assert len(PlannerState(directory).load()) == 1
    with sqlite3.connect(directory / "planner.db") as db:
        db.execute("UPDATE executors SET record = ?", (json.dumps({**raw, **CORRUPTIONS[corruption]}),))
    assert PlannerState(directory).load() == []
    assert rows(directory) == {} and list(rows(directory, "quarantine")) == ["owner"]


def test_a_row_that_does_not_parse_is_set_aside_and_the_others_load(saved):
    directory, raw = saved
    with sqlite3.connect(directory / "planner.db") as db:
        db.execute("INSERT INTO executors VALUES ('torn', '{\"format\": 1, \"node_')")
        db.execute("INSERT INTO executors VALUES ('not-owner', ?)", (json.dumps(raw),))  # another node's record
    assert [r.node_id for r in PlannerState(directory).load()] == ["owner"]
    assert sorted(rows(directory, "quarantine")) == ["not-owner", "torn"]


@pytest.mark.slow
def test_a_failed_write_is_reported_retried_and_never_ends_the_stream(owner, tmp_path):
    planner, registry = serve(state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(f"127.0.0.1:{planner.port}"))
    block_writes(tmp_path)  # every write fails, as on a full disk
    try:
        stream = Stream(f"127.0.0.1:{planner.port}", claim(owner, "owner", address="127.0.0.1:1"))
        assert stream.first().HasField("welcome")
        answer = wait_until(lambda: (a := stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5)).unsaved_records
                            and a, 10, "the failed write in the status")
        assert answer.unsaved_records == 1 and "disk is full" in answer.state_error
        assert answer.executors[0].connected  # the stream lives on
        assert rows(tmp_path) == {}  # the failed pass wrote nothing
        unblock_writes(tmp_path)  # space returns
        wait_until(lambda: stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).unsaved_records == 0, 10,
                   "the record written again")
        assert json.loads(rows(tmp_path)["owner"])["node_id"] == "owner"
        assert stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).state_error == ""
        stream.close()
    finally:
        planner.stop(0)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "plan.json"
    write_atomically(target, b"old")
    (tmp_path / "other").mkdir()
    with pytest.raises(OSError):
        write_atomically(tmp_path / "other", b"new")  # a directory cannot be replaced by a file
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "plan.json"]


def test_status_says_so_when_the_state_cannot_be_written(owner, tmp_path, capsys):
    from swapmoe.cli import main as cli

    block_writes(tmp_path)
    planner, _ = serve(state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    stream = Stream(f"127.0.0.1:{planner.port}", claim(owner, "owner", address="127.0.0.1:1"))
    try:
        stream.first()
        stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(f"127.0.0.1:{planner.port}"))
        wait_until(lambda: stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).unsaved_records, 10, "the failure")
        cli.main(["planner", "status", "--planner", f"127.0.0.1:{planner.port}"])
        assert "planner state: 1 records not written to disk" in capsys.readouterr().out
    finally:
        stream.close()
        planner.stop(0)
    with pytest.raises(grpc.RpcError):  # stopped: nothing answers
        stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=1)


def record(node_id: str, version: int = 1) -> ExecutorRecord:
    """A checked record of node ``node_id`` that runs a plan of ``version``."""
    from test_planner_registry import MIN_BUDGET, registration

    reg = registration(MIN_BUDGET + 400)
    reg.node_id = node_id
    registered = check_registration(reg)
    plan = Plan(version, (2, 2), origin="planner:even")
    return ExecutorRecord(node_id, registered.registration, registered.memory, desired=plan, acked=plan,
                          state=ppb.PLAN_STATE_ACKED, version=version, secret_digest=digest("s"), reason="why")


def test_nothing_is_lost_on_restart_and_an_erased_record_stays_erased(tmp_path):
    state = PlannerState(tmp_path, write_behind_s=0.05)
    for node_id in ("a", "b", "c"):
        state.save(record(node_id))
    state.save(record("a", version=2))
    state.erase("b")
    state.close()
    loaded = {r.node_id: r for r in PlannerState(tmp_path).load()}
    assert sorted(loaded) == ["a", "c"] and loaded["a"].desired == Plan(2, (2, 2), origin="planner:even")
    assert loaded["a"].version == 2 and not loaded["a"].connected and loaded["c"].reason == "why"


class Watched:
    """A database connection that notes which thread calls it."""

    def __init__(self, db):
        self.db, self.threads = db, set()

    def __getattr__(self, name):
        self.threads.add(threading.current_thread().name)
        return getattr(self.db, name)

    def __enter__(self):
        self.threads.add(threading.current_thread().name)
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)


def test_save_and_erase_do_no_io_on_the_callers_thread(tmp_path):
    state = PlannerState(tmp_path)  # writes at once: on its own thread
    state._db = watched = Watched(state._db)
    state.save(record("a"))
    wait_until(lambda: "a" in rows(tmp_path), 5, "the record written behind")
    state.erase("a")
    wait_until(lambda: rows(tmp_path) == {}, 5, "the record erased behind")
    assert watched.threads == {"planner-state"}
    state.close()


def test_with_write_behind_a_record_reaches_the_database_only_when_flushed(tmp_path):
    state = PlannerState(tmp_path, write_behind_s=60)
    live = record("a")
    state.save(live)
    live.reason = "changed after save"  # the registry goes on changing its record: the copy noted is kept
    assert rows(tmp_path) == {}
    state.close()
    assert json.loads(rows(tmp_path)["a"])["reason"] == "why"


def test_a_failed_pass_is_retried_and_reported_then_cleared(tmp_path):
    block_writes(tmp_path)
    state = PlannerState(tmp_path)
    state.save(record("a"))
    state.save(record("b"))
    wait_until(lambda: state.health()[0] == 2, 5, "the failure reported")
    assert "disk is full" in state.health()[1] and rows(tmp_path) == {}
    state.erase("b")  # forgotten while failing: never written back
    unblock_writes(tmp_path)
    wait_until(lambda: state.health() == (0, ""), 5, "the records written again")
    state.close()
    assert list(rows(tmp_path)) == ["a"]


def test_a_json_store_is_imported_once_and_its_files_moved_aside(tmp_path):
    files = tmp_path / "executors"
    files.mkdir()
    encoder = PlannerState(tmp_path / "encoder")
    for i, node_id in enumerate(("a", "b")):  # the payload a JSON store held, one file per executor
        (files / f"{i}.json").write_text(json.dumps(encoder._to_json(record(node_id))))
    (files / "torn.json").write_text('{"format": 1, "node_')
    encoder.close()
    assert sorted(r.node_id for r in PlannerState(tmp_path).load()) == ["a", "b"]
    assert not files.exists() and sorted(p.name for p in (tmp_path / "executors.migrated").iterdir()) == \
        ["0.json", "1.json", "torn.json"]
    assert len(rows(tmp_path, "quarantine")) == 1
    files.mkdir()
    (tmp_path / "executors.migrated" / "0.json").rename(files / "0.json")
    with sqlite3.connect(tmp_path / "planner.db") as db:
        db.execute("DELETE FROM executors WHERE node_id = 'a'")
    assert [r.node_id for r in PlannerState(tmp_path).load()] == ["b"]  # the database exists: no second import


def foreign_database(path):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE executors (id INTEGER)")


def newer_schema(path):
    PlannerState(path.parent).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 2")


@pytest.mark.parametrize("make, why", [
    (foreign_database, r"is not a SwapMoE planner database \(application_id 0\)"),
    (lambda path: path.write_text("not a database, but long enough to have a header " * 4),
     "is not a SwapMoE planner database: file is not a database"),
    (newer_schema, "has planner schema 2; this planner reads schema 1"),
    (lambda path: path.mkdir(), "is not a SwapMoE planner database"),
], ids=["another program's", "not a database", "a newer schema", "a directory"])
def test_a_database_that_is_not_the_planners_is_refused_by_name(tmp_path, make, why):
    make(tmp_path / "planner.db")
    with pytest.raises(InvalidField, match=f"^state_dir: {tmp_path / 'planner.db'} {why}"):
        PlannerState(tmp_path)
