"""How every SwapMoE process logs: plain text for people, or one JSON object per line for log
collectors (Loki, Elasticsearch, CloudWatch), chosen with ``--log-format`` / SWAPMOE_LOG_FORMAT.

JSON lines carry ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, then every
``extra`` field of the call as a key of its own, so the executor's request lines
(``swapmoe.requests``) are queried by ``request_id`` or ``finish_reason`` without parsing text.
The formatter is python-json-logger's: it already knows which record attributes are the logging
module's own, serializes what JSON cannot hold with ``str`` and folds tracebacks into the line.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# An access log, like a web server's: its lines are shown even when the rest of the process is quiet.
REQUESTS_LOGGER = "swapmoe.requests"


class JsonLines(JsonFormatter):
    """python-json-logger's formatter with the time first, in UTC, to the microsecond."""

    def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, timezone.utc).isoformat()
        super().add_fields(log_data, record, message_dict)


def formatter(format: str) -> logging.Formatter:
    """The formatter for ``format`` ("text" or "json")."""
    if format == "text":
        return logging.Formatter(TEXT_FORMAT)
    if format == "json":
        return JsonLines("{levelname}{name}{message}", style="{",
                         rename_fields={"levelname": "level", "name": "logger"}, json_ensure_ascii=False)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {format!r}")


def configure(format: str = "text", verbose: bool = False, stream=None) -> None:
    """Send the root logger's records to ``stream`` (stderr) in ``format``: INFO and above when
    ``verbose``, else WARNING and above, and the request lines of ``swapmoe.requests`` always.
    Replaces handlers set up before, so calling it twice does not print every line twice."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger(REQUESTS_LOGGER).setLevel(logging.INFO)
