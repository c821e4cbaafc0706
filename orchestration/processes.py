"""Start SwapMoE servers as separate processes and find the address each bound.

Every ``swapmoe ... serve`` command prints ``listening on HOST:PORT`` once it
serves; ``spawn`` waits for that line so callers can use ``--port 0``. ``launch`` starts
one without waiting (``Service.wait_listening`` waits), so many can start at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+:\d+)")


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    address: str
    output: list[str] = field(default_factory=list)
    listening: threading.Event = field(default_factory=threading.Event)  # set: address found, or exited

    def wait_listening(self, timeout: float) -> str:
        """The address once the server prints it; stops the process and raises if it exits or
        ``timeout`` s pass first."""
        if not self.listening.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.name} did not start within {timeout}s:\n{''.join(self.output)}")
        if not self.address:
            self.stop()
            raise RuntimeError(f"{self.name} exited with {self.process.wait()}:\n{''.join(self.output)}")
        return self.address

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
    return [sys.executable, "-m", "swapmoe.cli.main", *args]


def spawn(name: str, args: list[str], timeout: float = 120, log_dir: Path | None = None,
          new_session: bool = False) -> Service:
    """Run ``swapmoe *args`` and wait until it prints the address it listens on."""
    service = launch(name, args, log_dir, new_session)
    service.wait_listening(timeout)
    return service


def launch(name: str, args: list[str], log_dir: Path | None = None, new_session: bool = False) -> Service:
    """Start ``swapmoe *args`` and return at once; its output is kept (and written to
    ``log_dir/<name>.log``). ``new_session``: the child does not share the terminal's Ctrl-C,
    so the caller decides when, and in which order, its children stop."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(swapmoe_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=new_session)
    service = Service(name, process, "")

    def pump():  # keep reading so the child never blocks on a full pipe
        log = open(log_dir / f"{name}.log", "w") if log_dir else None
        for line in process.stdout:
            service.output.append(line)
            if log:
                log.write(line)
                log.flush()
            match = LISTENING.search(line)
            if match and not service.listening.is_set():
                service.address = match.group(1)
                service.listening.set()
        service.listening.set()

    threading.Thread(target=pump, daemon=True, name=f"pump-{name}").start()
    return service
