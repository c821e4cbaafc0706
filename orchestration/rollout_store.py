"""Rollouts on disk, so a control node that restarts picks each one up where it stood.

One JSON file per rollout under ``DIR/rollouts/``, written atomically (a temporary file, then
a rename): the request, and per target its planner, wave, the plan version sent, its state and
what it ran before (for a rollback), with the rollout's wave, state, message and timestamps.
Planner addresses and previous plans are tables that rows point into, so 10,000 targets take
well under a megabyte. A rollout under way changes with every ACK, so its file is rewritten at
most every ``interval_s`` (a change in between is kept dirty and written by the next save or
``flush``); a wave transition or a new state is written at once. A file that does not parse is
set aside as ``*.bad`` with a warning, as the planner does with its own state.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Callable

from google.protobuf import json_format

from swapmoe.core.errors import InvalidField
from swapmoe.core.files import write_atomically
from swapmoe.core.paths import path_name
from swapmoe.core.limits import MAX_PLAN_VERSION, MAX_REASON_CHARS, check_node_id, check_range, check_text
from swapmoe.orchestration.rollouts import Previous, Rollout, Target, check_plan, check_request
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb

log = logging.getLogger(__name__)
FORMAT = 1
_ID = re.compile(r"^rollout-[0-9]{1,18}$")


class RolloutStore:
    def __init__(self, directory: Path, interval_s: float = 0.5):
        self.directory = Path(directory) / "rollouts"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidField("state_dir", f"cannot create {self.directory}: {error.strerror or error}") from error
        self.interval_s = interval_s
        self._written: dict[str, float] = {}  # rollout id -> monotonic time of its last write
        self._dirty: set[str] = set()
        self._lock = threading.Lock()

    def path(self, rollout_id: str) -> Path:
        if not _ID.match(rollout_id):
            raise InvalidField("rollout_id", f"{rollout_id!r} is not a rollout id")
        return self.directory / f"{path_name('rollout_id', rollout_id)}.json"

    def save(self, rollout_id: str, snapshot: Callable[[], dict], urgent: bool = True) -> None:
        """Write ``snapshot()`` now when ``urgent`` or the last write is ``interval_s`` old;
        otherwise remember the rollout is dirty."""
        with self._lock:
            due = urgent or time.monotonic() - self._written.get(rollout_id, 0.0) >= self.interval_s
            if not due:
                self._dirty.add(rollout_id)
                return
            self._write(rollout_id, snapshot())

    def flush(self, rollout_id: str, snapshot: Callable[[], dict]) -> None:
        """Write a change that a throttled ``save`` kept back, if any."""
        with self._lock:
            if rollout_id in self._dirty:
                self._write(rollout_id, snapshot())

    def _write(self, rollout_id: str, data: dict) -> None:
        write_atomically(self.path(rollout_id), json.dumps(data, separators=(",", ":")).encode())
        self._written[rollout_id] = time.monotonic()
        self._dirty.discard(rollout_id)

    def delete(self, rollout_id: str) -> None:
        with self._lock:
            self.path(rollout_id).unlink(missing_ok=True)
            self._written.pop(rollout_id, None)
            self._dirty.discard(rollout_id)

    def load(self) -> list[Rollout]:
        """Every rollout saved; unreadable files are renamed ``*.bad`` and skipped."""
        rollouts = []
        for path in sorted(self.directory.glob("rollout-*.json")):
            try:
                rollout = from_json(json.loads(path.read_text()))
                if f"{rollout.rollout_id}.json" != path.name:
                    raise ValueError(f"it holds {rollout.rollout_id}")
                rollouts.append(rollout)
            except (ValueError, KeyError, TypeError, IndexError, OSError, json_format.ParseError) as error:
                log.warning("ignoring rollout state %s (%s); setting it aside as %s.bad", path, error, path.stem)
                path.replace(path.with_suffix(".bad"))
        return rollouts


def to_json(rollout: Rollout) -> dict:
    """The rollout as JSON; callers hold whatever lock guards it."""
    planners: dict[str, int] = {}
    plans: dict[bytes, int] = {}
    plan_list = []
    rows = []
    for t in rollout.targets.values():
        plan_index = -1
        if t.previous.plan is not None:
            key = t.previous.plan.SerializeToString(deterministic=True)
            if key not in plans:
                plans[key] = len(plan_list)
                plan_list.append(json_format.MessageToDict(t.previous.plan))
            plan_index = plans[key]
        rows.append([t.node_id, planners.setdefault(t.planner, len(planners)), t.wave, t.version, int(t.state),
                     plan_index, t.previous.budget_bytes, t.reason])
    return {
        "format": FORMAT, "rollout_id": rollout.rollout_id,
        "request": json_format.MessageToDict(rollout.request),
        "state": int(rollout.state), "ends_as": int(rollout.ends_as), "wave": rollout.wave,
        "message": rollout.message, "started_ns": rollout.started_ns, "updated_ns": rollout.updated_ns,
        "wave_started_ns": rollout.wave_started_ns, "next_wave_ns": rollout.next_wave_ns,
        "planners": list(planners), "previous_plans": plan_list,
        "targets": rows,  # [node id, planner, wave, version sent, state, previous plan, previous budget, reason]
    }


def from_json(raw: dict) -> Rollout:
    """A rollout from ``to_json``'s form, every value checked (ValueError on anything odd)."""
    if raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format')} is not {FORMAT}")
    request = json_format.ParseDict(raw["request"], fpb.StartRolloutRequest())
    settings = check_request(request)
    planners = [str(p) for p in raw["planners"]]
    plans = [json_format.ParseDict(p, common_pb2.Plan()) for p in raw["previous_plans"]]
    for plan in plans:
        check_plan(plan)
    targets = {}
    for row in raw["targets"]:
        target = _target(row, planners, plans)
        targets[target.node_id] = target
    rollout = Rollout(str(raw["rollout_id"]), request, settings, dict(sorted(targets.items())),
                      started_ns=int(raw["started_ns"]), state=_enum(raw["state"], fpb.RolloutState),
                      wave=int(raw["wave"]), message=str(raw["message"])[:MAX_REASON_CHARS],
                      updated_ns=int(raw["updated_ns"]), wave_started_ns=int(raw["wave_started_ns"]),
                      next_wave_ns=int(raw["next_wave_ns"]), ends_as=_enum(raw["ends_as"], fpb.RolloutState))
    if not _ID.match(rollout.rollout_id) or not targets:
        raise ValueError("no rollout id or no targets")
    if any(not wave for wave in rollout.by_wave):
        raise ValueError("a wave without nodes")
    check_range("wave", rollout.wave, 0, len(rollout.by_wave) - 1)
    return rollout


def _target(row: list, planners: list[str], plans: list[common_pb2.Plan]) -> Target:
    node_id, planner, wave, version, state, plan_index, budget, reason = row
    check_node_id("node_id", node_id)
    check_range("version", int(version), 0, MAX_PLAN_VERSION)
    check_range("wave", int(wave), 0, 10_000)
    check_text("reason", str(reason), MAX_REASON_CHARS)
    previous = Previous(plans[_index(plan_index, plans)] if plan_index != -1 else None, int(budget))
    return Target(node_id, planners[_index(planner, planners)], int(wave), previous, int(version),
                  _enum(state, fpb.RolloutNodeState), str(reason))


def _index(value, table: list) -> int:
    if not 0 <= int(value) < len(table):
        raise ValueError(f"index {value} is outside its table of {len(table)}")
    return int(value)


def _enum(value, enum_type) -> int:
    if int(value) not in enum_type.values():
        raise ValueError(f"{value} is not a {enum_type.DESCRIPTOR.name}")
    return int(value)
