"""Where profiles live and how they are read back: plain JSON, versioned, checked.

One directory per (model fingerprint, profiling set) for accuracy and per (model fingerprint,
device) for the device profile::

    ROOT/<fingerprint>/accuracy/<profiling set>/  profile.json  scores.jsonl  e_accuracy.json  summary.md
    ROOT/<fingerprint>/devices/<device>/          device.json   e_latency.json  summary.md

JSON, not pickle or joblib: a profile may come from another machine, and unpickling runs
whatever code the file names; JSON holds only numbers and text, loads everywhere, and a
reviewer can read and diff it. Fitted models are stored as their weights
(``swapmoe.profiler.performance_models`` evaluates them with numpy).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from swapmoe.core.files import write_atomically
from swapmoe.core.paths import path_name, under

FORMAT = 1
SCORES = "scores.jsonl"


class ProfileError(ValueError):
    """A profile that is missing, of another format, or made for another model."""


def default_root() -> Path:
    return Path(os.environ.get("SWAPMOE_PROFILES", Path.home() / ".cache" / "swapmoe" / "profiles"))


def slug(text: str) -> str:
    """A directory name for free text (a device name, a node id)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80].rstrip("-.") or "device"


def accuracy_dir(root: Path, fingerprint: str, set_name: str) -> Path:
    return under(root, ("model_fingerprint", fingerprint)) / "accuracy" / path_name("profiling set", set_name)


def device_dir(root: Path, fingerprint: str, device: str) -> Path:
    """A device profile's directory: the fingerprint and the device may come from another machine, so
    both are checked to stay one name each under ``root`` (``swapmoe.core.paths``)."""
    return under(root, ("model_fingerprint", fingerprint)) / "devices" / path_name("device", slug(device))


def write_json(path: Path, kind: str, body: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"format": FORMAT, "kind": kind, **body}, indent=1, sort_keys=True)
    write_atomically(path, (data + "\n").encode())  # a profile is no secret: readable like the files beside it


def read_json(path: Path, kind: str, fingerprint: str | None = None) -> dict:
    """``path``'s body, refused unless it is a ``kind`` file of this format (and, given
    ``fingerprint``, made for that model)."""
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"no {kind} profile at {path}") from None
    except (OSError, ValueError) as error:
        raise ProfileError(f"{path} is not a readable profile: {error}") from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise ProfileError(f"{path} is not a {kind} profile")
    if body.get("format") != FORMAT:
        raise ProfileError(f"{path} has profile format {body.get('format')}; this version reads format {FORMAT}")
    check_fingerprint(body, fingerprint, path)
    return body


def check_fingerprint(body: dict, fingerprint: str | None, path: Path) -> None:
    if fingerprint is not None and body.get("model_fingerprint") != fingerprint:
        raise ProfileError(f"{path} was built for model {body.get('model_fingerprint')}, not for this model "
                           f"({fingerprint}); profile this model instead")


def read_scores(path: Path) -> list[dict]:
    """Scored configurations appended so far. A last line cut off by a crash is dropped from the
    file, so the next append starts on a line of its own."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def append_score(path: Path, row: dict) -> None:
    """One line per result, flushed and synced before the run counts it done."""
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
