"""What the fleet benchmark watches: processes' /proc figures, health checks on a thread, a
simulated fleet's status lines, and a planner started with its control port.

``benchmarks.fleet`` measures with these; they know nothing of its sections or report.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.fleet_report import percentiles
from swapmoe.orchestration.processes import Service, spawn
from swapmoe.rpc import transport
from swapmoe.simulation.fleet import parse_status

ROOT = Path(__file__).resolve().parents[1]
TELEMETRY_S = 10  # each simulated executor reports every 10 s (issue 15's idle goal)
STATUS_EVERY_S = 0.2  # the simulators' status lines: the resolution of "all connected" and "all acked"
HEALTH_EVERY_S = 0.05
CHECK_TIMEOUT_S = 2.0
CONTROL = re.compile(r"control RPCs and health also on (\S+:\d+)")


def spawn_planner(name: str, work: Path, *args: str) -> tuple[Service, str]:
    """``swapmoe planner serve`` with a control port; the service (its address: the executors')
    and the control address."""
    planner = spawn(name, ["planner", "serve", "--port", "0", "--control-port", "0", "--no-device-profiling", *args],
                    log_dir=work)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [m.group(1) for line in list(planner.output) if (m := CONTROL.search(line))]
        if found:
            return planner, found[0]
        time.sleep(0.05)
    planner.stop()
    raise RuntimeError(f"{name} did not print its control port:\n{''.join(planner.output)}")


def proc_sample(pid: int) -> dict:
    """RSS and threads (``/proc/PID/status``), CPU seconds used so far (utime + stime, ``/proc/PID/stat``)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rss_bytes": int(status["VmRSS"].split()[0]) * 1024, "threads": int(status["Threads"]),
            "cpu_s": (int(fields[11]) + int(fields[12])) / ticks}


class HealthProbe:
    """A ``grpc.health.v1`` Check every 50 ms on a thread; latencies kept with their times. A
    ``reference`` probe (an idle server on the same machine) shows what the machine adds; an
    ``executor_port`` probe checks the planner's other port over the same windows."""

    def __init__(self, address: str, reference: "HealthProbe | None" = None,
                 executor_port: "HealthProbe | None" = None):
        self.reference, self.executor_port = reference, executor_port
        self.channel = transport.channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.samples: list[tuple[float, float, str]] = []  # (monotonic, seconds, status code name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="health-probe")

    def start(self) -> "HealthProbe":
        self._thread.start()
        if self.executor_port is not None:
            self.executor_port.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.channel.close()
        if self.executor_port is not None:
            self.executor_port.stop()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            began = time.monotonic()
            try:
                self.stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            self.samples.append((began, time.monotonic() - began, code))
            due = max(due + HEALTH_EVERY_S, time.monotonic())

    def window(self, t0: float, t1: float) -> dict:
        """p50/p99/max (ms) of the checks begun between ``t0`` and ``t1`` (a failed one counts as
        the time it took: DEADLINE_EXCEEDED as the timeout), and the failures by status code."""
        found = [(s, code) for t, s, code in list(self.samples) if t0 <= t <= t1]
        failed = collections.Counter(code for _, code in found if code != "OK")
        window = {**percentiles([s * 1e3 for s, _ in found]), "checks": len(found), "failed": dict(failed)}
        if self.reference is not None:
            window["reference"] = self.reference.window(t0, t1)
        if self.executor_port is not None:
            window["executor_port"] = self.executor_port.window(t0, t1)
        return window


class Sim:
    """A ``swapmoe.simulation.fleet`` process and its status lines, each timed as it arrives."""

    def __init__(self, planner: str, count: int, ramp_s: float, start: int = 0, log_dir: Path | None = None):
        self.count, self.launched = count, time.monotonic()
        args = ["--planner", planner, "--count", str(count), "--start", str(start), "--telemetry-interval",
                str(TELEMETRY_S), "--ramp", str(ramp_s), "--status-every", str(STATUS_EVERY_S)]
        self.process = subprocess.Popen([sys.executable, "-m", "swapmoe.simulation.fleet", *args], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.history: list[tuple[float, dict]] = []  # (monotonic, parsed status line)
        self.other: list[str] = []  # every other line: start, errors by code, the last status
        self.ended = False
        self._log = open(log_dir / f"sim-{start}+{count}.log", "w") if log_dir else None
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True, name=f"sim-{start}").start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            now = time.monotonic()
            if self._log:
                self._log.write(line)
            with self._changed:
                if line.startswith("fleet-sim t="):
                    self.history.append((now, parse_status(line)))
                else:
                    self.other.append(line.rstrip())
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    @property
    def latest(self) -> dict:
        with self._changed:
            return self.history[-1][1] if self.history else {"connected": 0, "acked": 0, "telemetry": 0,
                                                               "errors": 0, "reconnects": 0}

    def first(self, condition: Callable[[dict], bool], after: float = 0.0,
              timeout: float = 300.0) -> tuple[float, dict]:
        """The first status line read after ``after`` (monotonic) that satisfies ``condition``."""
        deadline, i = time.monotonic() + timeout, 0
        with self._changed:
            while True:
                for i in range(i, len(self.history)):
                    t, status = self.history[i]
                    if t >= after and condition(status):
                        return t, status
                i = len(self.history)
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    last = self.history[-1][1] if self.history else self.other[-3:]
                    raise TimeoutError(f"fleet-sim ({self.count} nodes): condition not met; last status {last}")
                self._changed.wait(left)

    def stop(self) -> list[str]:
        """SIGTERM; the error lines the simulator prints on its way out."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        time.sleep(0.2)
        return [line for line in self.other if line.startswith("fleet-sim error")]
