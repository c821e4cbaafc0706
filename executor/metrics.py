"""Serving statistics: counters, recent latencies and histograms, for telemetry reports and Prometheus."""

from __future__ import annotations

import bisect
import collections
import threading


def percentile(values, q: float) -> int:
    """Nearest-rank percentile of ``values`` (0 when empty)."""
    ordered = sorted(values)
    if not ordered:
        return 0
    return int(ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))])


class Histogram:
    """Counts per upper bound (Prometheus buckets, seconds), plus sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


# vLLM's buckets, with finer ones at the low end for small models on CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)


class ServingStats:
    def __init__(self, window: int = 2048):
        self._lock = threading.Lock()
        self.tokens_total = 0
        self.requests_total = 0
        self._ttft = collections.deque(maxlen=window)
        self._itl = collections.deque(maxlen=window)
        self.ttft_histogram = Histogram(TTFT_BUCKETS)
        self.itl_histogram = Histogram(ITL_BUCKETS)
        # Requests as their calls ended (``executor.request_log``), refused and failed ones included.
        self.prompt_tokens_total = 0
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()  # (finish reason, code)
        self.e2e_histogram = Histogram(E2E_BUCKETS)

    def token(self, gap_ns: int | None) -> None:
        with self._lock:
            self.tokens_total += 1
            if gap_ns is not None:
                self._itl.append(gap_ns)
                self.itl_histogram.observe(gap_ns / 1e9)

    def first_token(self, ttft_ns: int) -> None:
        with self._lock:
            self._ttft.append(ttft_ns)
            self.ttft_histogram.observe(ttft_ns / 1e9)

    def finished(self) -> None:
        with self._lock:
            self.requests_total += 1

    def request_ended(self, finish_reason: str, code: str, prompt_tokens: int, seconds: float) -> None:
        """A Generate call ended: how (finish reason, status code name), its prompt, its time end to end."""
        with self._lock:
            self.prompt_tokens_total += prompt_tokens
            self.outcomes[finish_reason, code] += 1
            self.e2e_histogram.observe(seconds)

    def requests(self) -> tuple[dict[tuple[str, str], int], int, list[tuple[str, int]], float]:
        """(requests by (finish reason, code), prompt tokens, end-to-end latency buckets, their sum)."""
        with self._lock:
            return (dict(self.outcomes), self.prompt_tokens_total, self.e2e_histogram.cumulative(),
                    self.e2e_histogram.sum)

    def histograms(self) -> tuple[list[tuple[str, int]], float, list[tuple[str, int]], float]:
        """(TTFT buckets, TTFT sum, inter-token buckets, inter-token sum), consistent with each other."""
        with self._lock:
            return (self.ttft_histogram.cumulative(), self.ttft_histogram.sum,
                    self.itl_histogram.cumulative(), self.itl_histogram.sum)

    def snapshot(self) -> dict:
        """Counters and latency percentiles (readers derive rates from successive snapshots)."""
        with self._lock:
            return dict(
                tokens_total=self.tokens_total,
                requests_total=self.requests_total,
                time_to_first_token_p50_ns=percentile(self._ttft, 50),
                inter_token_p50_ns=percentile(self._itl, 50),
                inter_token_p99_ns=percentile(self._itl, 99),
            )
