"""The fleet file of ``swapmoe fleet up``: what to start and where, checked as a whole.

A TOML file names planners (``[planner]``, or ``[[planner]]`` tables for a sharded fleet),
the control node (``[control]``), executors to start here (``[[executor]]``, each ``count``
times) and real machines that are only checked and listed (``[[device]]``). ``load`` reads
it into plain dataclasses, relative paths resolved against the file's directory, and every
error names its table and key (``executor[1].budget: ...``). Nothing here starts a process.

Keys (all optional unless marked): top level ``log_dir``; ``[planner]`` and ``[control]``:
``port`` (0: a free one), ``host`` (default 127.0.0.1; 0.0.0.0 for devices on the network),
``state_dir``, ``args`` (extra command-line arguments); ``[[executor]]``: ``model`` and
``budget`` (required), ``count``, ``name``, ``labels``, ``planner``, ``port`` (the first of
``count`` consecutive ones), ``host``, ``device`` (torch device), ``state_dir`` (one
directory per node under it), ``args``; ``[[device]]``: ``address`` and ``node_id``
(required), ``labels``, ``planner``.

Node ids: an ``[[executor]]`` table makes ``<name>-0`` ... ``<name>-<count-1>``, ``name``
defaulting to the model directory's name. Each executor and device dials one planner: the
``planner`` index its table gives, else one chosen by a hash of its node id (stable across
runs and machines, unlike Python's ``hash``).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swapmoe.core.errors import InvalidField
from swapmoe.core.labels import check_labels
from swapmoe.core.limits import check_node_id
from swapmoe.core.sizes import parse_size

LOCAL_HOST = "127.0.0.1"
MAX_COUNT = 64  # executors per table: a development fleet, not a data centre
_TABLES = {"planner", "control", "executor", "device", "log_dir"}
_SERVER_KEYS = {"port", "host", "state_dir", "args"}
_EXECUTOR_KEYS = {"model", "budget", "count", "name", "labels", "planner", "port", "host", "device", "state_dir",
                  "args"}
_DEVICE_KEYS = {"address", "node_id", "labels", "planner"}


@dataclass(frozen=True)
class ServerSpec:
    """A planner or the control node: where it listens, where it keeps state, extra CLI args."""

    port: int = 0
    host: str = LOCAL_HOST
    state_dir: Path | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutorSpec:
    """One executor process to start (a table with ``count = 3`` gives three of these)."""

    node_id: str
    model: Path
    budget_bytes: int
    planner: int  # index into FleetSpec.planners
    labels: dict[str, str] = field(default_factory=dict)
    port: int = 0
    host: str = LOCAL_HOST
    device: str = "cpu"
    state_dir: Path | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceSpec:
    """A real machine running its own executor: checked and listed, never started."""

    node_id: str
    address: str
    planner: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetSpec:
    planners: tuple[ServerSpec, ...]
    control: ServerSpec
    executors: tuple[ExecutorSpec, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    log_dir: Path | None = None


def load(path: Path | str) -> FleetSpec:
    """Read and check a fleet file; raises InvalidField (a ValueError) naming the table and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read the fleet file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    return parse(data, path.resolve().parent)


def parse(data: dict[str, Any], base: Path) -> FleetSpec:
    """A fleet from a parsed TOML document; relative paths are taken against ``base``."""
    _known_keys("", data, _TABLES)
    planners = tuple(_server(f"planner[{i}]" if isinstance(data.get("planner"), list) else "planner", t, base)
                     for i, t in enumerate(_tables(data, "planner")))
    planners = planners or (ServerSpec(),)
    control_tables = _tables(data, "control")
    if len(control_tables) > 1:
        raise InvalidField("control", "there is one control node: write [control], not [[control]]")
    control = _server("control", control_tables[0], base) if control_tables else ServerSpec()
    executors = tuple(e for i, table in enumerate(_tables(data, "executor"))
                      for e in _executors(f"executor[{i}]", table, base, len(planners)))
    devices = tuple(_device(f"device[{i}]", t, len(planners)) for i, t in enumerate(_tables(data, "device")))
    if not executors and not devices:
        raise InvalidField("executor", "the fleet has no executors: add an [[executor]] table (started here) "
                                       "or a [[device]] table (a machine that runs its own)")
    spec = FleetSpec(planners, control, executors, devices,
                     _path("log_dir", data["log_dir"], base) if "log_dir" in data else None)
    _check_unique(spec)
    return spec


def planner_for(node_id: str, planners: int) -> int:
    """The planner a node dials when its table names none: a stable hash of its node id."""
    # SHA-256, not CRC-32: a CRC is linear, so ids that differ in a digit split unevenly.
    return int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "big") % planners


def node_ids(name: str, count: int) -> list[str]:
    return [f"{name}-{i}" for i in range(count)]


def model_label(model: Path) -> str:
    """The ``model`` label an executor of this checkpoint registers (its directory's name)."""
    return model.name


def dial_address(host: str, port: int) -> str:
    """Where a process on this machine reaches a server bound to ``host``."""
    return f"{LOCAL_HOST if host in ('0.0.0.0', '::', '') else host}:{port}"


# -- tables ------------------------------------------------------------------------------------


def _server(where: str, table: dict, base: Path) -> ServerSpec:
    _known_keys(where, table, _SERVER_KEYS)
    return ServerSpec(port=_port(f"{where}.port", table.get("port", 0)),
                      host=_text(f"{where}.host", table.get("host", LOCAL_HOST)),
                      state_dir=_path(f"{where}.state_dir", table["state_dir"], base) if "state_dir" in table else None,
                      args=_args(f"{where}.args", table.get("args", [])))


def _executors(where: str, table: dict, base: Path, planners: int) -> list[ExecutorSpec]:
    _known_keys(where, table, _EXECUTOR_KEYS)
    for key in ("model", "budget"):
        if key not in table:
            raise InvalidField(f"{where}.{key}", "is required")
    model = _path(f"{where}.model", table["model"], base)
    if not (model / "config.json").is_file():
        raise InvalidField(f"{where}.model", f"no checkpoint at {model} (no config.json there)")
    budget = table["budget"]
    if isinstance(budget, bool) or not isinstance(budget, (str, int)):
        raise InvalidField(f"{where}.budget", f"expected a size such as \"512MiB\", got {budget!r}")
    try:
        budget_bytes = parse_size(str(budget))
    except ValueError as error:
        raise InvalidField(f"{where}.budget", str(error)) from None
    count = _integer(f"{where}.count", table.get("count", 1), 1, MAX_COUNT)
    name = _text(f"{where}.name", table.get("name", model.name))
    planner = _planner_index(f"{where}.planner", table, planners)
    labels = _labels(f"{where}.labels", table.get("labels", {}))
    port = _port(f"{where}.port", table.get("port", 0))
    if port and port + count - 1 > 65535:
        raise InvalidField(f"{where}.port", f"{count} executors need ports {port} to {port + count - 1}, past 65535")
    host = _text(f"{where}.host", table.get("host", LOCAL_HOST))
    device = _text(f"{where}.device", table.get("device", "cpu"))
    state_dir = _path(f"{where}.state_dir", table["state_dir"], base) if "state_dir" in table else None
    args = _args(f"{where}.args", table.get("args", []))
    executors = []
    for i, node_id in enumerate(node_ids(name, count)):
        check_node_id(f"{where}.name", node_id)
        executors.append(ExecutorSpec(
            node_id, model, budget_bytes, planner_for(node_id, planners) if planner is None else planner, labels,
            port + i if port else 0, host, device, state_dir / node_id if state_dir else None, args))
    return executors


def _device(where: str, table: dict, planners: int) -> DeviceSpec:
    _known_keys(where, table, _DEVICE_KEYS)
    for key in ("address", "node_id"):
        if key not in table:
            raise InvalidField(f"{where}.{key}", "is required")
    address = _text(f"{where}.address", table["address"])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InvalidField(f"{where}.address", f"expected HOST:PORT, got {address!r}")
    node_id = _text(f"{where}.node_id", table["node_id"])
    check_node_id(f"{where}.node_id", node_id)
    planner = _planner_index(f"{where}.planner", table, planners)
    return DeviceSpec(node_id, address, planner_for(node_id, planners) if planner is None else planner,
                      _labels(f"{where}.labels", table.get("labels", {})))


def _check_unique(spec: FleetSpec) -> None:
    """Node ids and fixed ports may not repeat across tables."""
    seen: dict[str, str] = {}
    for kind, items in (("executor", spec.executors), ("device", spec.devices)):
        for item in items:
            if item.node_id in seen:
                raise InvalidField(f"{kind}.node_id", f"{item.node_id!r} is used twice (also by a {seen[item.node_id]} "
                                                      f"table): give the tables different names")
            seen[item.node_id] = kind
    ports: dict[int, str] = {}
    named = [(f"planner[{i}]", p.port) for i, p in enumerate(spec.planners)] + [("control", spec.control.port)]
    named += [(f"executor {e.node_id}", e.port) for e in spec.executors]
    for where, port in named:
        if port and port in ports:
            raise InvalidField(f"{where}.port", f"port {port} is also {ports[port]}'s")
        ports[port] = where


# -- values ------------------------------------------------------------------------------------


def _tables(data: dict, key: str) -> list[dict]:
    value = data.get(key, [])
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InvalidField(key, f"expected [{key}] or [[{key}]] tables, got {value!r}")
    return tables


def _known_keys(where: str, table: dict, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise InvalidField(f"{where}.{key}" if where else key,
                               f"unknown key; expected one of {', '.join(sorted(allowed))}")


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidField(where, f"expected a non-empty string, got {value!r}")
    return value


def _integer(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(where, f"expected an integer from {low} to {high}, got {value!r}")
    return value


def _port(where: str, value: Any) -> int:
    return _integer(where, value, 0, 65535)


def _path(where: str, value: Any, base: Path) -> Path:
    return base / _text(where, value)  # an absolute path stays as it is


def _args(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise InvalidField(where, f"expected a list of strings (extra command-line arguments), got {value!r}")
    return tuple(value)


def _labels(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidField(where, f"expected a table such as {{ class = \"phone\" }}, got {value!r}")
    for key, label in value.items():
        if not isinstance(label, str):
            raise InvalidField(f"{where}.{key}", f"a label value is a string; write \"{label}\"")
    check_labels(where, value)
    return dict(value)


def _planner_index(where: str, table: dict, planners: int) -> int | None:
    if "planner" not in table:
        return None
    return _integer(where, table["planner"], 0, planners - 1)
