"""Figures of the paper report: matplotlib PNGs beside the Markdown, drawn from results only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402


class Figures:
    """Saves figures under ``directory`` and gives the Markdown that shows them."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.made: list[str] = []

    def new(self, columns: int = 1, width: float = 5.0, height: float = 3.4):
        """A figure with ``columns`` axes side by side."""
        return plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)

    def save(self, figure, name: str, caption: str) -> str:
        """Writes ``name``.png; returns its Markdown image line."""
        self.directory.mkdir(parents=True, exist_ok=True)
        figure.tight_layout()
        figure.savefig(self.directory / f"{name}.png", dpi=100)
        plt.close(figure)
        self.made.append(name)
        return f"![{caption}]({self.directory.name}/{name}.png)"
