"""Identifiers that become file or directory names pass one function first.

A model fingerprint, a device's name, a rollout id or a profiling set may arrive from another
process (an executor's profile, a request); joined to a directory unchecked, ``../..`` or an
absolute path would write anywhere the process may. ``path_name`` admits only names that stay
one component of the directory they are joined to.
"""

from __future__ import annotations

import re
from pathlib import Path

from swapmoe.core.errors import InvalidField

MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def path_name(field: str, value: str) -> str:
    """``value``, refused (InvalidField naming ``field``) unless it is 1 to 128 letters, digits, dots,
    underscores or dashes starting with a letter or digit: never empty, ``.``, ``..``, absolute, or
    holding a separator."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value) > MAX_NAME_CHARS:
        shown = value[:80] + "..." if isinstance(value, str) and len(value) > 80 else value
        raise InvalidField(field, f"{shown!r} cannot name a file: use 1 to {MAX_NAME_CHARS} letters, digits, '.', "
                                  f"'_' or '-', starting with a letter or digit")
    return value


def under(directory: Path, *names: tuple[str, str]) -> Path:
    """``directory`` joined with each ``(field, name)``'s checked name."""
    path = Path(directory)
    for field, name in names:
        path = path / path_name(field, name)
    return path
