"""The last acknowledged plan, kept on disk so a restarted executor resumes it.

Stored as the plan's protobuf in JSON (readable, and parsed by the one converter the
services use), written atomically: a crash mid-write leaves the previous plan.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import json_format

from swapmoe import convert
from swapmoe.plan import Plan
from swapmoe.v1 import common_pb2

FILE = "plan.json"


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
    except json_format.ParseError as error:
        raise ValueError(f"{path}: not a plan ({error})") from error
