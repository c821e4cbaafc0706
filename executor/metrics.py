"""Serving statistics: counters and recent latencies, for telemetry reports."""

from __future__ import annotations

import collections
import threading


def percentile(values, q: float) -> int:
    """Nearest-rank percentile of ``values`` (0 when empty)."""
    ordered = sorted(values)
    if not ordered:
        return 0
    return int(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))])


class ServingStats:
    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.tokens_total = 0
        self.requests_total = 0
        self.queue_depth = 0
        self._ttft = collections.deque(maxlen=window)
        self._itl = collections.deque(maxlen=window)

    def token(self, gap_ns: int | None) -> None:
        with self._lock:
            self.tokens_total += 1
            if gap_ns is not None:
                self._itl.append(gap_ns)

    def first_token(self, ttft_ns: int) -> None:
        with self._lock:
            self._ttft.append(ttft_ns)

    def finished(self) -> None:
        with self._lock:
            self.requests_total += 1

    def queued(self, delta: int) -> None:
        with self._lock:
            self.queue_depth += delta

    def snapshot(self) -> dict:
        """Counters and latency percentiles (readers derive rates from successive snapshots)."""
        with self._lock:
            return dict(
                tokens_total=self.tokens_total,
                requests_total=self.requests_total,
                queue_depth=self.queue_depth,
                time_to_first_token_p50_ns=percentile(self._ttft, 50),
                inter_token_p50_ns=percentile(self._itl, 50),
                inter_token_p99_ns=percentile(self._itl, 99),
            )
