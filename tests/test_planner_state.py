"""The planner's records on disk: a record that holds a wrong value is set aside, never read as
something else; a write that fails (a full disk) is kept, reported by the status RPC and written
again once it can be, never fatal to a stream; no temporary file is left behind."""

from __future__ import annotations

import json

import grpc
import pytest

from swapmoe.core.files import write_atomically
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


@pytest.fixture
def saved(owner, tmp_path):
    """The directory of a planner that saved one record (node ``owner``), and that record's JSON."""
    planner, registry = serve(state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    stream = Stream(f"127.0.0.1:{planner.port}", claim(owner, "owner", address="127.0.0.1:1"))
    stream.first()
    stream.close()
    planner.stop(0)
    (path,) = (tmp_path / "executors").glob("*.json")
    return tmp_path, path, json.loads(path.read_text())


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_record_holding_a_wrong_value_is_set_aside_not_misread(saved, corruption):
    directory, path, raw = saved
    assert len(PlannerState(directory).load()) == 1
    path.write_text(json.dumps({**raw, **CORRUPTIONS[corruption]}))
    assert PlannerState(directory).load() == []
    assert path.with_suffix(".bad").exists() and not path.exists()


@pytest.mark.slow
def test_a_failed_write_is_reported_retried_and_never_ends_the_stream(owner, tmp_path):
    planner, registry = serve(state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(f"127.0.0.1:{planner.port}"))
    state = PlannerState(tmp_path)
    blocked = state.path("owner")
    (blocked / "in-the-way").mkdir(parents=True)  # the record's file cannot be replaced: its write fails
    try:
        stream = Stream(f"127.0.0.1:{planner.port}", claim(owner, "owner", address="127.0.0.1:1"))
        assert stream.first().HasField("welcome")
        answer = wait_until(lambda: (a := stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5)).unsaved_records
                            and a, 10, "the failed write in the status")
        assert answer.unsaved_records == 1 and "in-the-way" not in answer.state_error and answer.state_error
        assert answer.executors[0].connected  # the stream lives on
        assert [p.name for p in (tmp_path / "executors").iterdir()] == [blocked.name]  # no temporary file left
        (blocked / "in-the-way").rmdir()
        blocked.rmdir()  # space returns
        wait_until(lambda: stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).unsaved_records == 0, 10,
                   "the record written again")
        assert json.loads(blocked.read_text())["node_id"] == "owner"
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

    planner, _ = serve(state_dir=tmp_path, settings=PlannerSettings(profile_devices=False))
    (PlannerState(tmp_path).path("owner") / "x").mkdir(parents=True)
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
