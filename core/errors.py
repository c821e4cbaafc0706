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


class Busy(RuntimeError):
    """A bounded resource is full; the caller should retry later (RESOURCE_EXHAUSTED)."""


class NotFound(LookupError):
    """A named thing does not exist (NOT_FOUND)."""
