"""One line per generation request: its id, tokens, timings and how it ended.

The Generate handler keeps a ``RequestRecord`` while it streams. When the call ends, whichever
way (finished, stopped, cancelled by its client, refused, failed), ``report_request`` writes the
line at INFO on the ``swapmoe.requests`` logger with every field as an ``extra`` (keys of their
own in JSON logs: ``swapmoe.core.logs``), counts the request in ``ServingStats`` (Prometheus) and
publishes a KIND_REQUEST_FINISHED event carrying the request id to telemetry subscribers.
Timings are the handler's: from the call's arrival, queue included, as its client sees them."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from swapmoe.executor.metrics import ServingStats
from swapmoe.executor.telemetry import EventKind, TelemetryHub
from swapmoe.executor.text import Chunk

log = logging.getLogger("swapmoe.requests")


def new_request_id() -> str:
    """An id for a request whose client gave none: 32 hex digits, unique without coordination."""
    return uuid.uuid4().hex


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started_ns: int = field(default_factory=time.perf_counter_ns)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ns: int = 0  # when the first generated token reached the handler; 0: none did
    ended_ns: int = 0
    # The generation's ("length", "stop", "eos", "context_full"); "cancelled" or "error" when it had none.
    finish_reason: str = ""
    code: str = ""  # the gRPC status code's name the call ended with
    error: str = ""  # the status message of a failed call

    def chunk(self, chunk: Chunk) -> None:
        """Account for one streamed chunk."""
        if chunk.token_ids and not self.first_token_ns:
            self.first_token_ns = time.perf_counter_ns()
        self.completion_tokens += len(chunk.token_ids)
        self.finish_reason = chunk.finish_reason or self.finish_reason

    def end(self, code: str, error: str = "") -> None:
        self.ended_ns = time.perf_counter_ns()
        self.code, self.error = code, error
        if not self.finish_reason:
            self.finish_reason = "cancelled" if code in ("CANCELLED", "DEADLINE_EXCEEDED") else "error"

    @property
    def total_s(self) -> float:
        return (self.ended_ns - self.started_ns) / 1e9

    def fields(self) -> dict:
        """The line's fields; the same keys for every request (a time to first token of None: no token)."""
        total = self.total_s
        return dict(
            request_id=self.request_id,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            time_to_first_token_s=round((self.first_token_ns - self.started_ns) / 1e9, 6) if self.first_token_ns
            else None,
            total_s=round(total, 6),
            tokens_per_s=round(self.completion_tokens / total, 3) if total > 0 else 0.0,
            finish_reason=self.finish_reason,
            code=self.code,
            error=self.error,
        )

    def summary(self) -> str:
        """The line for people: ``<id> OK length: 5+12 tokens, first token 0.041 s, 0.310 s, 38.7 tokens/s``."""
        f = self.fields()
        first = "no token" if f["time_to_first_token_s"] is None else f"first token {f['time_to_first_token_s']:.3f} s"
        line = (f"{self.request_id} {self.code} {self.finish_reason}: {self.prompt_tokens}+{self.completion_tokens} "
                f"tokens, {first}, {f['total_s']:.3f} s, {f['tokens_per_s']:.1f} tokens/s")
        return f"{line}: {self.error}" if self.error else line


def report_request(record: RequestRecord, stats: ServingStats, hub: TelemetryHub) -> None:
    """Log, count and publish an ended request (``record.end`` was called)."""
    stats.request_ended(record.finish_reason, record.code, record.prompt_tokens, record.total_s)
    summary = record.summary()
    hub.event(EventKind.REQUEST_FINISHED, summary, request_id=record.request_id)
    log.info(summary, extra=record.fields())
