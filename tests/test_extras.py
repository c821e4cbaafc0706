"""Each process runs with only its own extra installed: the executor on an edge device without
Ray, scikit-learn, pymoo, matplotlib or rouge-score; the planner without torch or transformers.

Each check runs a real ``swapmoe ... serve`` process in which those packages are *absent*: a
``sitecustomize`` put on PYTHONPATH wraps the path finder on ``sys.meta_path`` so that they are
neither importable (``import ray`` raises ModuleNotFoundError) nor visible to probes
(``importlib.util.find_spec`` answers None, ``importlib.metadata`` lists no distribution), which is
what an edge install looks like. A finder that raised on every look-up would be stricter than
reality: torch probes for scikit-learn with ``find_spec`` when it loads and handles its absence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.orchestration.processes import spawn
from swapmoe.planner_service.policy import PlannerSettings
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

from polling import wait_until

PLANNER_ONLY = ["ray", "sklearn", "pymoo", "matplotlib", "rouge_score"]  # the planner and models extras
EXECUTOR_ONLY = ["torch", "transformers", "safetensors", "tokenizers"]  # the executor extra

ABSENT = '''
"""Installed by tests/test_extras.py: the packages named in $SWAPMOE_TEST_ABSENT look uninstalled."""
import importlib.machinery, importlib.metadata, os, sys

_names = frozenset(n for n in os.environ.get("SWAPMOE_TEST_ABSENT", "").split(",") if n)
_dists = {d.lower() for n, ds in importlib.metadata.packages_distributions().items() if n in _names for d in ds}


class _Absent:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _names:
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        return (d for d in self.finder.find_distributions(*args, **kwargs)
                if (d.metadata["Name"] or "").lower() not in _dists)

    def invalidate_caches(self):
        self.finder.invalidate_caches()


if _names:
    sys.meta_path[:] = [_Absent(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@pytest.fixture
def without(tmp_path, monkeypatch):
    """``without(names)``: processes started after this see ``names`` as not installed."""
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "sitecustomize.py").write_text(ABSENT)

    def hide(names: list[str]) -> None:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "absent"),
                                                                        os.environ.get("PYTHONPATH")])))
        monkeypatch.setenv("SWAPMOE_TEST_ABSENT", ",".join(names))

    return hide


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_hidden_package_is_missing_for_imports_probes_and_metadata(without):
    """The check bites: with torch hidden, the executor cannot even load."""
    without(["torch"])
    probe = python("import importlib.util, importlib.metadata as m, grpc\n"
                   "print(importlib.util.find_spec('torch'), [d for d in m.distributions() if d.name == 'torch'])\n"
                   "import swapmoe.executor.engine")
    assert probe.stdout.strip() == "None []"
    assert "ModuleNotFoundError: No module named 'torch'" in probe.stderr


@pytest.mark.slow
def test_the_executor_modules_and_its_serve_command_load_without_the_planner_libraries(without):
    without(PLANNER_ONLY)
    code = ("import sys, swapmoe.executor.server, swapmoe.executor.engine, swapmoe.executor.planner_link, "
            "swapmoe.executor.prometheus\n"
            "from swapmoe.cli.main import build_parser\n"
            "try:\n    build_parser().parse_args(['executor', 'serve', '--help'])\n"
            "except SystemExit as done:\n    assert done.code == 0\n")
    loaded = python(code)
    assert loaded.returncode == 0, loaded.stderr
    assert "--model" in loaded.stdout and "--planner" in loaded.stdout


@pytest.mark.slow
def test_an_executor_without_the_planner_libraries_serves_dials_its_planner_and_reports_metrics(
        without, tiny_model_dir, tmp_path):
    planner, _ = serve_planner(settings=PlannerSettings(profile_devices=False))
    without(PLANNER_ONLY)
    executor = spawn("executor", ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB",
                                  "--port", "0", "--node-id", "edge-only", "--state-dir", str(tmp_path / "state"),
                                  "--planner", f"127.0.0.1:{planner.port}", "--metrics-port", "0"], timeout=180)
    try:
        with transport.channel(executor.address) as channel:
            described = executor_pb2_grpc.ExecutorServiceStub(channel).Describe(epb.DescribeRequest(), timeout=10)
            assert described.node_id == "edge-only"
            chunks = list(executor_pb2_grpc.ExecutorServiceStub(channel).Generate(
                epb.GenerateRequest(text="hello", max_new_tokens=2), timeout=60))
            assert chunks[-1].usage.completion_tokens == 2
        with transport.channel(f"127.0.0.1:{planner.port}") as channel:
            stub = planner_pb2_grpc.PlannerServiceStub(channel)
            wait_until(lambda: any(e.node_id == "edge-only" and e.connected and e.state == ppb.PLAN_STATE_ACKED
                                   for e in stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=5).executors),
                       timeout=60, what="the executor registered and acknowledged its planner's plan")
        metrics_line = next(line for line in executor.output if "/metrics" in line)
        url = metrics_line.split()[-1]
        assert b"swapmoe_" in urllib.request.urlopen(url, timeout=10).read()
    finally:
        code = executor.stop()
        planner.stop(0)
    output = "".join(executor.output)
    assert code == 0, output
    assert "Traceback" not in output and "No module named" not in output, output


@pytest.mark.slow
def test_the_planner_serves_without_torch_or_transformers(without, tmp_path):
    without(EXECUTOR_ONLY)
    planner = spawn("planner", ["planner", "serve", "--port", "0", "--state-dir", str(tmp_path / "state"),
                                "--profiles", str(tmp_path / "profiles")], timeout=120)
    try:
        with transport.channel(planner.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            status = planner_pb2_grpc.PlannerServiceStub(channel).GetPlanStatus(ppb.PlanStatusRequest(), timeout=10)
            assert list(status.executors) == []
    finally:
        code = planner.stop()
    output = "".join(planner.output)
    assert code == 0, output
    assert "Traceback" not in output and "No module named" not in output, output


def test_the_extras_name_what_each_process_needs_and_nothing_heavier():
    """What the checks above hide is what the other extras bring: pyproject.toml says the same."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
                for r in requirements}

    heavy_planner = {"ray", "scikit-learn", "pymoo", "matplotlib", "rouge-score"}
    assert not names(extras["executor"]) & heavy_planner
    assert not names(extras["planner"]) & {"torch", "transformers", "safetensors", "tokenizers"}
    assert {"ray", "scikit-learn", "pymoo", "matplotlib"} <= names(extras["planner"])
    assert "rouge-score" in names(extras["models"])
    assert not names(project["dependencies"]) & (heavy_planner | {"torch", "transformers"})
