"""Markdown tables and number formats for the paper report: every cell is text or a number
passed in from the results (the test re-renders perturbed results to check that)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def table(head: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return num(value)
    return str(value)


def num(x: float | None, digits: int = 3) -> str:
    """``digits`` significant figures (whole numbers of more digits as they are), no exponent."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x))) + 1  # digits before the point (<= 0 below 0.1)
    return f"{x:.{max(0, digits - magnitude)}f}"


def pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def share(x: float) -> str:
    """A budget as a share of all experts."""
    return f"{x * 100:.0f}%"
