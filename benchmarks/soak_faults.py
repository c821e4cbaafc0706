"""The soak's two harder faults: a full disk under every process, and a planner restarted in the
middle of a staged rollout (``benchmarks.soak``).

A full disk is made real without root: ``RLIMIT_FSIZE`` of 0 bytes, set on the running processes
with ``prlimit``, makes every write to a file fail (EFBIG; CPython ignores SIGXFSZ), as writes
fail on a full disk, and lifting the limit is space coming back. Their logs go to the soak's own
pipes, so only the processes' state writes fail.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from swapmoe.rpc import transport
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb, fleet_pb2_grpc

ENDED = (fpb.ROLLOUT_STATE_SUCCEEDED, fpb.ROLLOUT_STATE_FAILED, fpb.ROLLOUT_STATE_ABORTED)


def full_disk(pids: list[int], full: bool) -> None:
    """Make every file write of these processes fail (``full``), or succeed again."""
    for pid in pids:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0 if full else hard, hard))


@dataclass
class DiskFullPhase:
    """What a full disk did: the failures each side reported while it lasted, and how long after space
    returned every plan was on disk again (or what was still missing after 30 s)."""

    seconds: float
    executor_errors: set[str] = field(default_factory=set)  # Describe.state_error values seen
    planner_unsaved: int = 0  # the most records the planner had not written
    recovered_s: float | None = None
    missing: str = ""

    def to_json(self) -> dict:
        return dict(seconds=self.seconds, executor_errors=sorted(self.executor_errors),
                    planner_unsaved=self.planner_unsaved, recovered_s=self.recovered_s, missing=self.missing)


def watch_disk_full(soak, phase: DiskFullPhase) -> None:
    """While the disk is full, note what each side reports (the soak keeps changing budgets and plans)."""
    status, described = soak.planner_status(), soak.describe()
    if described is not None and described.state_error:
        phase.executor_errors.add(described.state_error.split(" (")[0])
    if status is not None:
        phase.planner_unsaved = max(phase.planner_unsaved, status.unsaved_records)


def saved_plan(state_dir: Path) -> common_pb2.Plan | None:
    try:
        return json_format.Parse((state_dir / "plan.json").read_text(), common_pb2.Plan())
    except (OSError, json_format.ParseError):
        return None


def wait_recovered(soak, phase: DiskFullPhase, state_dir: Path, since: float) -> None:
    """Space is back: within 30 s the executor's plan.json must hold the plan it runs, Describe must
    report no state error, and the planner must have written every record."""
    deadline = since + 30
    while time.monotonic() < deadline:
        status, described = soak.planner_status(), soak.describe()
        if status is not None and described is not None and not status.unsaved_records \
                and not described.state_error and saved_plan(state_dir) == described.plan:
            phase.recovered_s = round(time.monotonic() - since, 1)
            return
        time.sleep(0.5)
    phase.missing = (f"planner unsaved {status and status.unsaved_records}, executor state_error "
                     f"{described and described.state_error!r}, plan.json {saved_plan(state_dir)} vs running "
                     f"{described and described.plan}")


@dataclass
class RolloutAcrossRestart:
    """A staged rollout during which the planner restarted."""

    rollout_id: str = ""
    targeted: int = 0
    state: str = ""
    acked: int = 0
    message: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return self.__dict__.copy()


def start_rollout(fleet_address: str, layers: int) -> tuple[fleet_pb2_grpc.FleetServiceStub, RolloutAcrossRestart]:
    """A canary, then half, then all of the planner's executors get 2 experts per layer."""
    stub = fleet_pb2_grpc.FleetServiceStub(transport.channel(fleet_address))
    request = fpb.StartRolloutRequest(plan=common_pb2.Plan(experts_per_layer=[2] * layers, origin="soak rollout"),
                                      canary_nodes=1, wave_percents=[50, 100], bake_ms=3000, timeout_ms=90_000)
    started = stub.StartRollout(request, timeout=30)
    return stub, RolloutAcrossRestart(started.rollout_id, started.targeted)


def wait_canary(stub, rollout: RolloutAcrossRestart, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=rollout.rollout_id, summary_only=True), timeout=10)
        if r.acked >= 1 or r.state in ENDED:
            return
        time.sleep(0.2)


def finish(stub, rollout: RolloutAcrossRestart, started: float, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=rollout.rollout_id, summary_only=True), timeout=10)
        except grpc.RpcError:
            time.sleep(1)
            continue
        rollout.state, rollout.acked, rollout.message = fpb.RolloutState.Name(r.state), r.acked, r.message
        if r.state in ENDED:
            break
        time.sleep(0.5)
    rollout.seconds = round(time.monotonic() - started, 1)


def report(result: dict) -> str:
    """The report's sections on the two faults."""
    disk = result.get("disk_full")
    lines = ["## A full disk under every process"]
    if disk is None:
        lines.append("Not reached in this run.")
    else:
        recovered = (f"every plan was on disk again {disk['recovered_s']} s after space returned"
                     if disk["recovered_s"] is not None else f"**not recovered after 30 s**: {disk['missing']}")
        lines.append(f"RLIMIT_FSIZE 0 on the planner, the executor and the control node for {disk['seconds']:g} s "
                     f"(every file write fails, as on a full disk) while budgets and plans kept changing: the "
                     f"executor reported `{'; '.join(disk['executor_errors']) or 'nothing'}`, the planner up to "
                     f"{disk['planner_unsaved']} unsaved records; {recovered}. No process restarted, no stream "
                     f"ended for it, and every plan kept being ACKed (any other outcome is in the tables above).")
    lines += ["", "## Staged rollouts with the planner restarted mid-rollout",
              "| rollout | targeted | planner restarted | state | acked | took | message |", "|---|---|---|---|---|---|---|"]
    for r in result.get("rollouts", []):
        lines.append(f"| {r['rollout_id']} | {r['targeted']} | after the canary's ACK | {r['state']} | {r['acked']} | "
                     f"{r['seconds']} s | {r['message'] or ''} |")
    if not result.get("rollouts"):
        lines.append("| none in this run | | | | | | |")
    return "\n".join(lines) + "\n"
