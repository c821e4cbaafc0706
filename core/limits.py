"""Bounds on what a message may carry, checked before any work or lock.

Each bound is far above what a real model or device needs and far below what breaks the
arithmetic: a plan version fits a float and a JSON number exactly, a model's bytes fit
an int64 many times over, and no loop over experts or layers can run for long. Servers check
every field of every message against these before they take a lock or start work
(``validate_layout``, ``validate_plan`` and the ``check_*`` helpers here).
"""

from __future__ import annotations

import math

from swapmoe.core.errors import InvalidField

# Plan versions count plans: at 1,000 plans a second this lasts 285,000 years, and every
# version, plus one, is still exact in a double (JSON, Prometheus) and in uint64.
MAX_PLAN_VERSION = 2**53 - 1
# How far one plan may move an executor's version ahead of the plan it runs: no single call can
# spend the version space (2^53 - 1 is 2^21 such steps), while a planner counting one by one
# never comes near it.
MAX_VERSION_STEP = 2**32
# MoE layers in one model, and experts in one layer (the largest public models have
# under 100 MoE layers and 384 routed experts per layer).
MAX_LAYERS = 1024
MAX_EXPERTS_PER_LAYER = 65_536
# Bytes of a whole model, a budget or a reserve: 1 PiB.
MAX_BYTES = 1 << 50
# Tokens between resident-set updates: past a million, updates are off in all but name.
MAX_UPDATE_FREQUENCY = 1 << 20
# Sequences decoded together (a plan's rows, an executor's --max-batch).
MAX_ROWS = 4096
MAX_NODE_ID_CHARS = 128
MAX_LABEL_CHARS = 256  # short free text: a plan's origin, a model's class name, a dtype
MAX_REASON_CHARS = 4096  # a budget change's or a NACK's reason
# A model's content hash (``swapmoe.core.fingerprint``: 16 hex digits; up to a whole SHA-256).
MIN_FINGERPRINT_CHARS, MAX_FINGERPRINT_CHARS = 16, 64
MAX_ADDRESS_CHARS = 256  # host:port, a DNS name at most 253 characters
MAX_SECRET_CHARS = 128  # a node secret (``secrets.token_urlsafe(32)``: 43 characters)
MAX_TOKEN_IDS = 1 << 20  # a prompt's token ids (the executor also keeps them within its context)
MAX_TOPICS = 16  # telemetry topics in one request: each at most once
MAX_PROFILE_SAMPLES = 4096  # compute samples, load tiers or sweep points in one device profile
MAX_NODES_PER_REQUEST = 100_000
# Sampling: below this temperature logits / T overflows float32 for ordinary logits (the
# softmax turns into NaN); above the maximum the distribution is uniform in all but name.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1 << 20
MAX_SUBSCRIBE_INTERVAL_MS = 3_600_000
MAX_SUBSCRIBERS_PER_CALLER = 4  # an executor's telemetry streams one caller may hold at once
MAX_PROFILE_TOKEN_COUNTS = 16
MAX_PROFILE_REPEATS = 100
MAX_ROLLOUT_TIMEOUT_MS = 24 * 3_600_000


def check_range(field: str, value: int | float, low: int | float, high: int | float) -> None:
    """InvalidField unless ``low <= value <= high`` (NaN is out of every range)."""
    if not low <= value <= high:
        raise InvalidField(field, f"{value} is outside the allowed range {low} to {high}")


def check_text(field: str, value: str, limit: int = MAX_LABEL_CHARS) -> None:
    if len(value) > limit:
        raise InvalidField(field, f"has {len(value)} characters; at most {limit} are allowed")


def check_count(field: str, values, limit: int) -> None:
    if len(values) > limit:
        raise InvalidField(field, f"has {len(values)} entries; at most {limit} are allowed")


def check_node_id(field: str, node_id: str) -> None:
    """A node id names files, metrics and log lines: 1 to 128 printable characters."""
    if not node_id:
        raise InvalidField(field, "is empty")
    check_text(field, node_id, MAX_NODE_ID_CHARS)
    if not node_id.isprintable():
        raise InvalidField(field, f"{node_id!r} has non-printable characters")


def check_node_ids(field: str, node_ids) -> None:
    check_count(field, node_ids, MAX_NODES_PER_REQUEST)
    for i, node_id in enumerate(node_ids):
        check_node_id(f"{field}[{i}]", node_id)


def is_fingerprint(text: str) -> bool:
    """Whether ``text`` is a model fingerprint: 16 to 64 lowercase hex digits."""
    return (isinstance(text, str) and MIN_FINGERPRINT_CHARS <= len(text) <= MAX_FINGERPRINT_CHARS
            and not text.strip("0123456789abcdef"))


def check_fingerprint(field: str, fingerprint: str) -> None:
    """A model fingerprint names profile directories: empty (unknown) or 16 to 64 lowercase hex digits."""
    if fingerprint and not is_fingerprint(fingerprint):
        shown = fingerprint[:80] + "..." if len(fingerprint) > 80 else fingerprint
        raise InvalidField(field, f"{shown!r} is not a model fingerprint ({MIN_FINGERPRINT_CHARS} to "
                                  f"{MAX_FINGERPRINT_CHARS} lowercase hex digits)")


def check_finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidField(field, f"must be a finite number, got {value}")


def next_version(version: int) -> int:
    """The version after ``version``; never past ``MAX_PLAN_VERSION``."""
    if version >= MAX_PLAN_VERSION:
        raise InvalidField("plan.version", f"no version after {version}: plan versions end at {MAX_PLAN_VERSION}")
    return version + 1
