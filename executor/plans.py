"""The plan in force on one executor and its budget: which plans are accepted, how a budget
change shrinks the plan, and the copy on disk that a restarted executor resumes.

Bookkeeping over ``swapmoe.core.budget.MemoryModel``, with no locks and no model: the engine
applies what this decides, between two forward passes. The saved plan is the plan's protobuf
in JSON (readable, and parsed by the one converter the services use), written atomically so
a crash mid-write leaves the previous plan.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from google.protobuf import json_format

from swapmoe.core.budget import MemoryModel
from swapmoe.core.errors import InvalidField
from swapmoe.core.plan import Plan, validate_plan
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2

FILE = "plan.json"
log = logging.getLogger(__name__)


class PlanBook:
    """The current plan and budget of one executor, checked against its ``MemoryModel``."""

    def __init__(self, memory: MemoryModel, budget_bytes: int, state_dir: Path | None = None):
        memory.check_budget(budget_bytes)
        if state_dir is not None:
            check_state_dir(Path(state_dir))
        self.memory = memory
        self.budget_bytes = budget_bytes
        self.state_dir = state_dir
        self.current = memory.default_plan(budget_bytes, 0, "executor:initial even split")

    def resume(self) -> str:
        """Adopt the last acknowledged plan from ``state_dir`` if it still applies; says what happened."""
        if self.state_dir is None:
            return "no state directory: starting from an even split"
        try:
            plan = load(self.state_dir)
            if plan is None:
                return "no saved plan: starting from an even split"
            validate_plan(plan, self.memory.layout)
        except ValueError as error:
            log.warning("ignoring the saved plan: %s", error)
            return f"ignored the saved plan ({error})"
        if reason := self.memory.over_budget(plan.experts_per_layer, self.budget_bytes):
            return f"ignored saved plan {plan.version}: {reason}"
        self.current = plan
        return f"resumed saved plan {plan.version} {list(plan.experts_per_layer)}"

    def review(self, plan: Plan) -> str:
        """Why a well-formed ``plan`` cannot replace the current one (a NACK), or "" (an ACK). A plan
        that carries a budget is checked against that budget."""
        if plan.version <= self.current.version:
            return f"plan.version {plan.version} is not newer than the current plan's version {self.current.version}"
        if plan.budget_bytes:
            try:
                self.memory.check_budget(plan.budget_bytes)
            except InvalidField as error:
                return f"the plan's {error}"
        return self.memory.over_budget(plan.experts_per_layer, plan.budget_bytes or self.budget_bytes)

    def accept(self, plan: Plan) -> None:
        """``plan`` runs from now on, and a restart resumes it."""
        self.current = plan
        if self.state_dir is not None:
            save(self.state_dir, plan)

    def shrunk_for(self, budget_bytes: int) -> Plan | None:
        """The current plan cut down to fit a new budget, or None when it fits (nothing changes yet)."""
        self.memory.check_budget(budget_bytes)
        plan = self.current
        kept = self.memory.shrink(plan.experts_per_layer, budget_bytes)
        if kept == tuple(plan.experts_per_layer):
            return None
        return Plan(plan.version, kept, plan.update_frequency, plan.strategy, "executor:shrunk for budget")

    def set_budget(self, budget_bytes: int, shrunk: Plan | None) -> None:
        """Adopt a new budget and the plan ``shrunk_for`` gave for it (once the slots have shrunk)."""
        self.memory.check_budget(budget_bytes)
        self.budget_bytes = budget_bytes
        if shrunk is not None:
            self.current = shrunk


def check_state_dir(directory: Path) -> None:
    """Raise InvalidField naming ``state_dir`` unless a plan can be kept there: at start-up, not at
    the first acknowledged plan."""
    if directory.exists() and not directory.is_dir():
        raise InvalidField("state_dir", f"{directory} is not a directory")
    if (directory / FILE).exists() and not (directory / FILE).is_file():
        raise InvalidField("state_dir", f"{directory / FILE}, where the saved plan is kept, is not a file; "
                                        f"remove it or choose another --state-dir")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidField("state_dir", f"cannot create {directory}: {error.strerror}") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InvalidField("state_dir", f"{directory} is not writable")


def save(directory: Path, plan: Plan) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{FILE}.{os.getpid()}"
    tmp.write_text(json_format.MessageToJson(convert.plan_to_pb(plan)))
    tmp.replace(directory / FILE)


def load(directory: Path) -> Plan | None:
    """The saved plan, None when there is none; ValueError when the file is unreadable."""
    path = Path(directory) / FILE
    if not path.exists():
        return None
    try:
        return convert.plan_from_pb(json_format.Parse(path.read_text(), common_pb2.Plan()))
    except (json_format.ParseError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a plan ({error})") from error
    except OSError as error:
        raise ValueError(f"{path}: unreadable ({error.strerror})") from error
