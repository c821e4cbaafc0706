"""argparse ``type``s for sizes and counts, shared by every ``swapmoe`` command group.

Each turns a bad value into ``ArgumentTypeError``, which argparse reports as one line naming
the flag.
"""

from __future__ import annotations

import argparse

from swapmoe.core.sizes import parse_size


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def size_or_zero(text: str) -> int:
    """A size, or 0 for "none" (a flag whose default is 0 accepts it spelled out)."""
    return 0 if text.strip() == "0" else size(text)


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0")
    return value


def non_negative_finite(text: str) -> float:
    """A number >= 0 that is not infinite (a rate, a target)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
