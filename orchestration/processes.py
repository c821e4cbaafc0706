"""Start SwapMoE servers as separate processes and find the address each bound.

Every ``swapmoe ... serve`` command prints ``listening on HOST:PORT`` once it
serves; ``spawn`` waits for that line so callers can use ``--port 0``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+:\d+)")


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    address: str
    output: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM (graceful: drain streams), then SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def swapmoe_command(*args: str) -> list[str]:
    """The command line of a ``swapmoe`` subcommand, run with this interpreter."""
    return [sys.executable, "-m", "swapmoe.orchestration.cli", *args]


def spawn(name: str, args: list[str], timeout: float = 120, log_dir: Path | None = None) -> Service:
    """Run ``swapmoe *args`` and wait until it prints the address it listens on."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(swapmoe_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    service = Service(name, process, "")
    found = threading.Event()

    def pump():  # keep reading so the child never blocks on a full pipe
        log = open(log_dir / f"{name}.log", "w") if log_dir else None
        for line in process.stdout:
            service.output.append(line)
            if log:
                log.write(line)
                log.flush()
            match = LISTENING.search(line)
            if match and not found.is_set():
                service.address = match.group(1)
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True, name=f"pump-{name}").start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if time.monotonic() > deadline:
            service.stop()
            raise TimeoutError(f"{name} did not start within {timeout}s:\n{''.join(service.output)}")
    if not service.address:
        service.stop()
        raise RuntimeError(f"{name} exited with {process.poll()}:\n{''.join(service.output)}")
    return service
