"""Waiting in tests for what another thread or process makes true."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """``condition()``'s first truthy value, polled every 50 ms; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
