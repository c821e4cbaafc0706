"""``swapmoe fleet up FILE``: a local fleet for development and demos, from a fleet file.

Planners start first, then the control node (pointed at every planner), then the executors
(each dialling its planner); it waits until every executor is connected (asking the control
node), prints what runs where and commands to try, and serves until SIGINT/SIGTERM/SIGHUP.
It then stops everything in reverse order: the executors first (they drain their streams),
the control node, the planners. ``[[device]]`` machines run their own executors: they are
only checked (``grpc.health.v1``) and listed. The file's format: ``fleet_spec``.

The children run in sessions of their own, so a Ctrl-C in the terminal reaches only this
process, which stops them in order (and a child never outlives a clean exit).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swapmoe.orchestration import fleet_spec
from swapmoe.orchestration.fleet_spec import ExecutorSpec, FleetSpec, ServerSpec
from swapmoe.orchestration.processes import Service, launch
from swapmoe.orchestration.balancing import list_nodes
from swapmoe.rpc import security, transport
from swapmoe.v1 import fleet_pb2_grpc, planner_pb2 as ppb

SERVER_START_S = 60  # a planner or the control node, from launch to listening
EXECUTOR_START_S = 300  # an executor may build its expert store first
EXECUTOR_DRAIN_S = 35  # an executor drains for --drain-seconds (30 by default) before it exits
POLL_S = 0.5
DEVICE_HEALTH_TIMEOUT_S = 2.0
# Extra command-line arguments per role ("planner", "control", "executor"), e.g. security flags.
ExtraArgs = Mapping[str, Sequence[str]]


class Interrupted(Exception):
    """A signal arrived while the fleet was starting."""


# -- command lines (pure) ----------------------------------------------------------------------


def planner_args(planner: ServerSpec, extra: ExtraArgs) -> list[str]:
    args = ["planner", "serve", "--host", planner.host, "--port", str(planner.port)]
    if planner.state_dir:
        args += ["--state-dir", str(planner.state_dir)]
    return args + [*planner.args, *extra.get("planner", ())]


def control_args(control: ServerSpec, planner_addresses: Sequence[str], extra: ExtraArgs) -> list[str]:
    args = ["fleet", "serve", "--host", control.host, "--port", str(control.port)]
    for address in planner_addresses:
        args += ["--planner", address]
    if control.state_dir:
        args += ["--state-dir", str(control.state_dir)]
    return args + [*control.args, *extra.get("control", ())]


def executor_args(executor: ExecutorSpec, planner_address: str, extra: ExtraArgs) -> list[str]:
    args = ["executor", "serve", "--model", str(executor.model), "--budget", str(executor.budget_bytes),
            "--host", executor.host, "--port", str(executor.port), "--planner", planner_address,
            "--node-id", executor.node_id, "--device", executor.device]
    for key, value in sorted(executor.labels.items()):
        args += ["--label", f"{key}={value}"]
    if executor.state_dir:
        args += ["--state-dir", str(executor.state_dir)]
    return args + [*executor.args, *extra.get("executor", ())]


def _dial(service: Service) -> str:
    host, _, port = service.address.rpartition(":")
    return fleet_spec.dial_address(host, int(port))


# -- the running fleet -------------------------------------------------------------------------


@dataclass
class Fleet:
    """The processes of a fleet, started in order and stopped in reverse."""

    spec: FleetSpec
    log_dir: Path
    extra: ExtraArgs = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    planners: list[Service] = field(default_factory=list)
    control: Service | None = None
    executors: dict[str, Service] = field(default_factory=dict)  # node id -> process

    @property
    def control_address(self) -> str:
        return _dial(self.control)

    def planner_address(self, index: int) -> str:
        return _dial(self.planners[index])

    def start(self) -> None:
        """Planners, control node, executors, each group launched at once; raises (and stops
        what started) when one fails to start or a signal arrives."""
        try:
            self.planners = [launch(f"planner-{i}", planner_args(p, self.extra), self.log_dir, new_session=True)
                             for i, p in enumerate(self.spec.planners)]
            self._wait_listening(self.planners, SERVER_START_S)
            addresses = [_dial(p) for p in self.planners]
            self.control = launch("control", control_args(self.spec.control, addresses, self.extra), self.log_dir,
                                  new_session=True)
            self._wait_listening([self.control], SERVER_START_S)
            self.executors = {e.node_id: launch(e.node_id, executor_args(e, addresses[e.planner], self.extra),
                                                self.log_dir, new_session=True) for e in self.spec.executors}
            self._wait_listening(list(self.executors.values()), EXECUTOR_START_S)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, services: list[Service], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for service in services:
            while not service.listening.wait(POLL_S):
                if self.stopping.is_set():
                    raise Interrupted()
                if time.monotonic() > deadline:
                    break
            service.wait_listening(0)  # raises with the child's output if it exited or timed out

    def wait_connected(self, timeout: float, channel: Callable[[str], grpc.Channel], out=sys.stdout) -> None:
        """Poll the control node until every executor started here is connected to its planner,
        with a progress line."""
        stub = fleet_pb2_grpc.FleetServiceStub(channel(self.control_address))
        wanted = set(self.executors)
        deadline = time.monotonic() + timeout
        connected: set[str] = set()
        while True:
            try:
                nodes, _ = list_nodes(stub, view=ppb.STATUS_VIEW_BRIEF, connected_only=True)
                connected = {n.status.node_id for n in nodes if n.status.connected} & wanted
            except grpc.RpcError:
                pass  # the control node or a planner is still settling: ask again
            waiting = sorted(wanted - connected)
            out.write(f"\rexecutors connected: {len(connected)}/{len(wanted)}"
                      + (f" (waiting for {', '.join(waiting[:5])}{', ...' if len(waiting) > 5 else ''})"
                         if waiting else "") + "\033[K")
            out.flush()
            if not waiting:
                out.write("\n")
                return
            self._check_alive()
            if self.stopping.wait(POLL_S):
                out.write("\n")
                raise Interrupted()
            if time.monotonic() > deadline:
                out.write("\n")
                raise TimeoutError(f"executors {', '.join(waiting)} did not connect to their planners within "
                                   f"{timeout:.0f}s; see their logs in {self.log_dir}")

    def _check_alive(self) -> None:
        for name, service in self._children():
            if service.process.poll() is not None:
                tail = "".join(service.output[-20:])
                raise RuntimeError(f"{name} exited with {service.process.returncode}; the end of its log "
                                   f"({self.log_dir / (service.name + '.log')}):\n{tail}")

    def serve(self, out=sys.stdout) -> None:
        """Until a signal: report a child that exits (once), keep the rest running."""
        reported = set()
        while not self.stopping.wait(1.0):
            for name, service in self._children():
                if name not in reported and service.process.poll() is not None:
                    reported.add(name)
                    print(f"{name} exited with {service.process.returncode}; its log: "
                          f"{self.log_dir / (service.name + '.log')}", file=out, flush=True)

    def stop(self, out=None) -> None:
        """Executors (all at once: each drains its streams), then the control node, then the planners."""
        for group, timeout in ((list(self.executors.values()), EXECUTOR_DRAIN_S), ([self.control], 15),
                               (list(reversed(self.planners)), 15)):
            group = [s for s in group if s is not None and s.process.poll() is None]
            if out and group:
                print(f"stopping {', '.join(s.name for s in group)}", file=out, flush=True)
            for service in group:
                service.process.send_signal(signal.SIGTERM)
            for service in group:
                service.stop(timeout)

    def _children(self) -> list[tuple[str, Service]]:
        named = [(f"planner {p.name}", p) for p in self.planners]
        named += [("the control node", self.control)] if self.control else []
        return named + [(f"executor {n}", s) for n, s in self.executors.items()]


# -- what runs where ---------------------------------------------------------------------------


def device_health(address: str, channel: Callable[[str], grpc.Channel]) -> str:
    """``reachable`` or ``unreachable (<why>)`` for a device's executor."""
    try:
        answer = health_pb2_grpc.HealthStub(channel(address)).Check(health_pb2.HealthCheckRequest(),
                                                                    timeout=DEVICE_HEALTH_TIMEOUT_S)
    except grpc.RpcError as error:
        return f"unreachable ({error.code().name})"
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return f"unreachable ({health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)})"
    return "reachable"


def summary(fleet: Fleet, channel: Callable[[str], grpc.Channel]) -> str:
    """A table of what runs where, then commands to try."""
    stub = fleet_pb2_grpc.FleetServiceStub(channel(fleet.control_address))
    try:
        nodes, _ = list_nodes(stub, view=ppb.STATUS_VIEW_BRIEF)
    except grpc.RpcError:
        nodes = []
    known = {n.status.node_id: n.status for n in nodes}
    rows = [("role", "node id", "address", "planner", "labels / state")]
    rows += [("planner", f"planner-{i}", fleet.planner_address(i), "", "") for i in range(len(fleet.planners))]
    rows.append(("control", "", fleet.control_address, "", ""))
    for e in fleet.spec.executors:
        status = known.get(e.node_id)
        labels = dict(status.labels) if status and status.labels else e.labels
        rows.append(("executor", e.node_id, _dial(fleet.executors[e.node_id]), fleet.planner_address(e.planner),
                     ",".join(f"{k}={v}" for k, v in sorted(labels.items()))))
    for d in fleet.spec.devices:
        status = known.get(d.node_id)
        state = device_health(d.address, channel) + (", connected" if status and status.connected else
                                                     ", not connected to its planner yet")
        rows.append(("device", d.node_id, d.address, fleet.planner_address(d.planner), state))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows]
    models = sorted({s.labels["model"] for s in known.values() if "model" in s.labels}
                    or {fleet_spec.model_label(e.model) for e in fleet.spec.executors})
    control = fleet.control_address
    lines += ["", f"logs: {fleet.log_dir}", "", "try:", f"  swapmoe fleet nodes --fleet {control}"]
    lines += [f"  swapmoe generate --fleet {control} --model {m} \"def fibonacci(n):\"" for m in models]
    lines += [f"  swapmoe planner status --planner {fleet.planner_address(0)}",
              f"  swapmoe fleet rollout --fleet {control} --wait 30", "", "Ctrl-C stops the fleet."]
    return "\n".join(lines)


def up(spec: FleetSpec, extra_args: ExtraArgs | None = None, connect_timeout: float = 300.0,
       channel: Callable[[str], grpc.Channel] = transport.channel, out=sys.stdout) -> int:
    """Start the fleet, wait for its executors, print where things run, serve until a signal,
    stop in reverse order. Returns the exit status."""
    log_dir = spec.log_dir or Path(tempfile.mkdtemp(prefix="swapmoe-fleet-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(spec, log_dir, dict(extra_args or {}))
    previous = {sig: signal.signal(sig, lambda *_: fleet.stopping.set())
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        print(f"starting {len(spec.planners)} planner(s), the control node and {len(spec.executors)} executor(s); "
              f"logs in {log_dir}", file=out, flush=True)
        fleet.start()
        fleet.wait_connected(connect_timeout, channel, out)
        print(summary(fleet, channel), file=out, flush=True)
        fleet.serve(out)
        return 0
    except Interrupted:
        print("interrupted while starting", file=out, flush=True)
        return 130
    except (RuntimeError, TimeoutError) as error:
        print(f"swapmoe: error: fleet up: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        fleet.stop(out)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _extra_args(args) -> dict[str, list[str]]:
    """Per-role arguments every process of the fleet gets: with ``--security DIR``, TLS with client
    certificates and tokens everywhere (each process takes its own certificate and token from DIR)."""
    if args.security is None:
        return {}
    flags = ["--security", str(args.security.resolve())]
    return {"planner": flags, "control": flags, "executor": flags}


def _channel(args) -> Callable[[str], grpc.Channel]:
    """fleet up's own calls (waiting for executors, the summary) as the control role."""
    if args.security is None:
        return transport.channel
    client = security.client_from_args(args, "control")
    return lambda address: transport.channel(address, client)


def run(args) -> None:
    spec = fleet_spec.load(args.file)
    sys.exit(up(spec, _extra_args(args), args.connect_timeout, channel=_channel(args)))


def add_up_parser(fleet_actions) -> None:
    """Add ``up`` to the ``swapmoe fleet`` subcommands."""
    p = fleet_actions.add_parser("up", help="start a local fleet (planners, control node, executors) from a file",
                                 description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="the fleet file (TOML): [planner], [control], [[executor]], [[device]]")
    p.add_argument("--connect-timeout", type=float, default=300.0,
                   help="seconds to wait for every executor to connect to its planner (default 300)")
    p.add_argument("--security", type=Path, metavar="DIR",
                   help="a `swapmoe dev-certs` directory: every process serves TLS, requires client certificates "
                        "(mutual TLS) and checks role tokens; the commands printed take the same flag")
    p.set_defaults(func=run)
