"""Start-up checks a server makes before it loads a model or binds: a mistake in a flag costs
milliseconds and one line naming the flag (a ValueError), not a model load and a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path


def check_model(path: Path) -> None:
    """``path`` is a checkpoint directory of an architecture the executor serves: read from its
    config.json alone (the executor's own check), before any weight is read."""
    if not path.exists():
        raise ValueError(f"--model: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"--model: {path} is not a directory (expected a Hugging Face checkpoint directory)")
    from swapmoe.executor.checkpoint import read_config  # torch and transformers: the executor's extra

    try:
        read_config(path)
    except ValueError as error:
        raise ValueError(f"--model: {error}") from None


def check_port_free(host: str, port: int | None, flag: str = "--port") -> None:
    """Binding ``host``:``port`` would succeed now (port 0 and None always do)."""
    if not port:
        return
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ValueError(f"--host: cannot resolve {host!r}: {error.strerror}") from None
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC's own listener does, so a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ValueError(f"{flag}: port {port} on {host} is in use") from None
                raise ValueError(f"{flag}: cannot bind {host}:{port}: {error.strerror}") from None


@contextlib.contextmanager
def binding(host: str, port: int, flag: str = "--port"):
    """Around a server's start: its bind failing after ``check_port_free`` passed (another process
    took the port meanwhile) is the same one-line error. gRPC says only RuntimeError "Failed to bind"."""
    try:
        yield
    except RuntimeError as error:
        if not str(error).startswith("Failed to bind"):
            raise
        raise ValueError(f"{flag}: cannot bind {host}:{port}: the port is in use or the host is not "
                         "an address of this machine") from None


def check_state_dir(path: Path | None, flag: str = "--state-dir") -> None:
    """``path`` is, or can be made, a directory this process may write."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag}: cannot create {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: {path} is not writable")
