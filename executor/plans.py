"""The plan in force on one executor and its budget: which plans are accepted, how a budget
change shrinks the plan, and the copy on disk that a restarted executor resumes.

``PlanBook`` is bookkeeping over ``swapmoe.core.budget.MemoryModel``, with no locks and no model:
the engine applies what it decides, between two forward passes. The saved plan is the plan's
protobuf in JSON (readable, and parsed by the one converter the services use), written
atomically so a crash mid-write leaves the previous plan. ``StateFiles`` keeps the state
directory's files (the plan, the node secret) through a full or failing disk: a write that
fails is said and retried, never raised, so a plan that runs is always acknowledged.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from google.protobuf import json_format

from swapmoe.core.budget import MemoryModel
from swapmoe.core.errors import InvalidField
from swapmoe.core.files import write_atomically
from swapmoe.core.limits import MAX_SECRET_CHARS, MAX_VERSION_STEP
from swapmoe.core.plan import Plan, validate_plan
from swapmoe.rpc import convert
from swapmoe.v1 import common_pb2

FILE = "plan.json"
SECRET_FILE = "node_secret"  # the planner's secret for this node id (``executor.planner_link``)
RETRY_S = 2.0  # how often a state file that could not be written is tried again
log = logging.getLogger(__name__)


class PlanBook:
    """The current plan and budget of one executor, checked against its ``MemoryModel``."""

    def __init__(self, memory: MemoryModel, budget_bytes: int, state_dir: Path | None = None, precision: str = ""):
        """``precision``: of every layer's experts in the starting plan ("": the checkpoint's)."""
        memory.check_budget(budget_bytes)
        if precision and precision not in memory.layout.precisions:
            kept = ", ".join(memory.layout.precisions) or "none: the checkpoint's only"
            raise InvalidField("precision", f"{precision!r} is not a precision this model's experts are kept at "
                                            f"(lower ones kept: {kept})")
        if state_dir is not None:
            check_state_dir(Path(state_dir))
        self.memory = memory
        self.budget_bytes = budget_bytes
        self.state_dir = state_dir
        self.files = StateFiles(Path(state_dir)) if state_dir is not None else None
        self.current = memory.default_plan(budget_bytes, 0, "executor:initial even split", precision)

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
        if reason := self.memory.over_budget(plan.experts_per_layer, self.budget_bytes, plan.precision):
            return f"ignored saved plan {plan.version}: {reason}"
        self.current = plan
        rows = f" rows={plan.rows}" if plan.rows else ""
        return f"resumed saved plan {plan.version} {list(plan.experts_per_layer)}{rows}"

    def check_step(self, plan: Plan) -> None:
        """InvalidField (``plan.version``) for a version more than ``MAX_VERSION_STEP`` ahead of the
        current plan's: one plan cannot spend the version space and lock out every later one."""
        if plan.version > self.current.version + MAX_VERSION_STEP:
            raise InvalidField("plan.version", f"{plan.version} is more than {MAX_VERSION_STEP} ahead of the "
                                               f"current plan's version {self.current.version}")

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
        return self.memory.over_budget(plan.experts_per_layer, plan.budget_bytes or self.budget_bytes, plan.precision)

    def accept(self, plan: Plan) -> str:
        """``plan`` runs from now on, and a restart resumes it; returns "", or why it is not saved yet
        (it is retried: ``StateFiles``)."""
        self.current = plan
        return self.files.keep(FILE, plan_json(plan)) if self.files is not None else ""

    def close(self) -> None:
        if self.files is not None:
            self.files.close()

    def shrunk_for(self, budget_bytes: int) -> Plan | None:
        """The current plan cut down to fit a new budget, or None when it fits (nothing changes yet)."""
        self.memory.check_budget(budget_bytes)
        plan = self.current
        kept, precision = self.memory.shrink(plan.experts_per_layer, budget_bytes, plan.precision)
        if kept == tuple(plan.experts_per_layer) and precision == plan.precision:
            return None
        return Plan(plan.version, kept, plan.update_frequency, plan.strategy, "executor:shrunk for budget",
                    rows=plan.rows, precision=precision)

    def set_budget(self, budget_bytes: int) -> None:
        self.memory.check_budget(budget_bytes)
        self.budget_bytes = budget_bytes

    def adopt(self, plan: Plan) -> str:
        """``plan`` (the current one, or ``shrunk_for`` a budget) runs from now on, not saved: a
        restart resumes the last plan the planner sent, under the budget it is given."""
        self.current = plan
        return ""


def check_state_dir(directory: Path) -> None:
    """Raise InvalidField naming ``state_dir`` unless a plan can be kept there: at start-up, not at
    the first acknowledged plan."""
    if directory.exists() and not directory.is_dir():
        raise InvalidField("state_dir", f"{directory} is not a directory")
    for name, what in ((FILE, "the saved plan"), (SECRET_FILE, "the node secret")):
        if (directory / name).exists() and not (directory / name).is_file():
            raise InvalidField("state_dir", f"{directory / name}, where {what} is kept, is not a file; "
                                            f"remove it or choose another --state-dir")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidField("state_dir", f"cannot create {directory}: {error.strerror}") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InvalidField("state_dir", f"{directory} is not writable")
    read_secret(directory)


def read_secret(directory: Path | None) -> str:
    """The node secret kept in ``directory`` ("" when there is none); InvalidField naming
    ``state_dir`` and the file when it cannot be read or is not one line of printable ASCII."""
    path = Path(directory) / SECRET_FILE if directory is not None else None
    if path is None or not path.exists():
        return ""
    try:
        secret = path.read_bytes().decode("ascii").strip()
    except OSError as error:
        raise InvalidField("state_dir", f"cannot read the node secret {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        secret = None
    if secret is None or not secret.isprintable() or " " in secret or len(secret) > MAX_SECRET_CHARS:
        raise InvalidField("state_dir", f"{path} is not a node secret (one line of printable ASCII, at most "
                                        f"{MAX_SECRET_CHARS} characters); remove it: the planner issues a new one")
    return secret


def plan_json(plan: Plan) -> str:
    return json_format.MessageToJson(convert.plan_to_pb(plan))


def save(directory: Path, plan: Plan) -> None:
    """Write ``plan`` to ``directory`` atomically; OSError leaves the previous file and no temporary one."""
    write_atomically(Path(directory) / FILE, plan_json(plan).encode())


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


class StateFiles:
    """Files kept in a state directory across restarts, each written atomically. A write that fails
    (a full disk, a read-only mount) is counted, said (``error``, a warning) and retried, at the
    next ``keep`` and every ``retry_s`` on a thread of its own, until it succeeds; ``keep`` never
    raises, so what it saves (an applied plan, a secret) is in force either way."""

    def __init__(self, directory: Path, retry_s: float = RETRY_S):
        self.directory, self.retry_s = directory, retry_s
        self.failures = 0  # writes that failed, retries included
        self._unsaved: dict[str, tuple[str, int]] = {}  # name -> (text, mode) not on disk yet
        self._errors: dict[str, str] = {}  # name -> why its last write failed
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._retrying: threading.Thread | None = None

    @property
    def error(self) -> str:
        """Why files are not saved, "" when every file is."""
        with self._lock:
            return "; ".join(self._errors.values())

    @property
    def unsaved(self) -> int:
        with self._lock:
            return len(self._unsaved)

    def keep(self, name: str, text: str, mode: int = 0o644) -> str:
        """Write ``text`` to the file ``name``; "" once written, else why not (it is retried)."""
        with self._lock:
            self._unsaved[name] = (text, mode)
            self._write(name, retry=False)
            if self._unsaved and self._retrying is None and not self._closed.is_set():
                self._retrying = threading.Thread(target=self._retry, daemon=True, name="state-files")
                self._retrying.start()
            return self._errors.get(name, "")

    def close(self) -> None:
        self._closed.set()

    def _write(self, name: str, retry: bool) -> None:
        text, mode = self._unsaved[name]
        path = self.directory / name
        try:
            write_atomically(path, text.encode(), mode)
        except OSError as error:
            self.failures += 1
            known = name in self._errors
            self._errors[name] = f"not saved to {path} ({error.strerror or error}); retried every {self.retry_s:g} s"
            (log.debug if retry and known else log.warning)("%s", self._errors[name])
            return
        if self._errors.pop(name, None):
            log.warning("saved %s: the state directory takes writes again", path)
        del self._unsaved[name]

    def _retry(self) -> None:
        while not self._closed.wait(self.retry_s):
            with self._lock:
                for name in list(self._unsaved):
                    self._write(name, retry=True)
                if not self._unsaved:
                    self._retrying = None  # under the lock: the next failing ``keep`` starts another
                    return
        with self._lock:
            self._retrying = None
