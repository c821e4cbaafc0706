"""Identifiers that name files pass one function (``swapmoe.core.paths.path_name``): a model
fingerprint or device name from another process cannot write outside the directory it is joined
to, neither on the planner (a device profile asked down a Connect stream) nor on an operator's
machine (``swapmoe profile device`` against a rogue executor)."""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.core.paths import path_name
from swapmoe.cli import main as cli
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve
from swapmoe.profiler import artifacts
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until
from planner_streams import claim

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_FINGERPRINT = "e1a419fec4d32150"  # the bundled LM, whose accuracy profile ships in profiles
ESCAPES = ["..", ".", "", "../../etc", "/tmp/abs", "a/b", "a\\b", "x\x00y", ".hidden", "-flag", "é", "a" * 129]


@pytest.mark.parametrize("name", ESCAPES, ids=repr)
def test_a_name_that_is_not_one_plain_path_component_is_refused(name):
    with pytest.raises(InvalidField, match="^device: .* cannot name a file"):
        path_name("device", name)


def test_plain_names_pass_and_profile_directories_stay_under_their_root(tmp_path):
    assert path_name("model_fingerprint", BUNDLED_FINGERPRINT) == BUNDLED_FINGERPRINT
    directory = artifacts.device_dir(tmp_path, BUNDLED_FINGERPRINT, "../../cpu-node/..")
    assert directory.parent == tmp_path / BUNDLED_FINGERPRINT / "devices"
    with pytest.raises(InvalidField, match="model_fingerprint"):
        artifacts.device_dir(tmp_path, "../../outside", "cpu")


class RogueExecutor(executor_pb2_grpc.ExecutorServiceServicer):
    """Answers Profile with a profile that names a model by a path."""

    def Profile(self, request, context):
        yield epb.ProfileProgress(fraction=1.0, stage="done", result=epb.ProfileResult(
            node_id="rogue", model_fingerprint="../../../escaped"))


def test_profiling_a_rogue_executor_writes_nothing_outside_the_profile_root(tmp_path, capsys):
    server = transport.start_server(lambda s: executor_pb2_grpc.add_ExecutorServiceServicer_to_server(
        RogueExecutor(), s), [])
    root = tmp_path / "deep" / "er" / "profiles"
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["profile", "device", "--executor", f"127.0.0.1:{server.port}", "--root", str(root)])
    finally:
        server.stop(0)
    assert exit_.value.code == 2
    assert "model_fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not any(tmp_path.rglob("device.json"))


def test_the_planner_refuses_a_device_profile_of_another_model_than_registered(owner, tmp_path):
    settings = PlannerSettings(accuracy_roots=(ROOT / "models" / "profiles",), profile_timeout_s=30)
    planner, registry = serve(state_dir=tmp_path / "state", settings=settings)
    outbox: queue.Queue = queue.Queue()
    registration = claim(owner, "rogue", address="127.0.0.1:1")
    registration.model_fingerprint = BUNDLED_FINGERPRINT  # claims a profiled model: the planner asks a profile
    outbox.put(ppb.ExecutorMessage(registration=registration))
    stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(f"127.0.0.1:{planner.port}"))
    stream = stub.Connect(iter(outbox.get, None), timeout=60)
    try:
        ask = next(m for m in stream if m.HasField("profile_request")).profile_request
        outbox.put(ppb.ExecutorMessage(profile_result=ppb.ProfileOutcome(request_id=ask.request_id, result=epb.ProfileResult(
            node_id="rogue", model_fingerprint="../../../escaped"))))
        state = wait_until(lambda: (s := registry.policy.status("rogue")).startswith("failed") and s, 30,
                           "the profile refused")
        assert "not of the model it registered" in state
    finally:
        outbox.put(None)
        stream.cancel()
        planner.stop(0)
    assert not (tmp_path / "escaped").exists()
    assert not list((tmp_path / "state").rglob("device.json"))
    with pytest.raises(grpc.RpcError):
        next(stream)
