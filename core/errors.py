"""Errors a request can cause, named for what the caller did wrong.

Each maps to one gRPC status in ``swapmoe.rpc.status``; code below the servers raises
these and never imports gRPC.
"""

from __future__ import annotations


class InvalidField(ValueError):
    """A request field is invalid; ``field`` names it (e.g. ``plan.experts_per_layer[3]``).
    Maps to INVALID_ARGUMENT, as does any other ``ValueError``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message

    def under(self, prefix: str) -> "InvalidField":
        """The same error for a field nested in ``prefix`` (``budget_bytes`` -> ``registration.budget_bytes``)."""
        return InvalidField(f"{prefix}.{self.field}", self.detail)


class Busy(RuntimeError):
    """A bounded resource is full; the caller should retry later (RESOURCE_EXHAUSTED)."""


class NotFound(LookupError):
    """A named thing does not exist (NOT_FOUND)."""


class Unauthenticated(PermissionError):
    """No credentials, or credentials nobody issued (UNAUTHENTICATED)."""


class Forbidden(PermissionError):
    """The caller may not do this, e.g. take over another executor's node id (PERMISSION_DENIED)."""


class Conflict(RuntimeError):
    """The request is well formed but the target's state forbids it now, e.g. forgetting an executor
    that is connected (FAILED_PRECONDITION)."""


class Corrupted(OSError):
    """Stored data fails its checksum or its own description (DATA_LOSS); the message names the file
    and what in it is damaged."""
