"""The paper's evaluation (``python -m benchmarks.paper``): one quick run makes every section's
tables and figures, and the report is a function of what that run measured: rendered again from
its ``results.json`` it is the same, and rendered from perturbed results every measured cell
changes (no number is typed in, apart from the paper's own in its "paper" column)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.paper import report

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper")
    done = subprocess.run([sys.executable, "-m", "benchmarks.paper", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_quick_run_writes_every_section_table_and_figure(quick_run):
    text = (quick_run / "RESULTS-paper.md").read_text()
    results = json.loads((quick_run / "results.json").read_text())
    assert list(results["sections"]) == list(report.SECTIONS)
    assert text.count("\n## ") == len(report.SECTIONS) + 1  # the claims, then one per section
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
    assert len(images) >= len(report.SECTIONS)
    for image in images:
        assert (quick_run / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    claims = _tables(text)[0]
    assert len(claims) > len(report.SECTIONS)  # every section states claims beside measurements
    assert all(row[-1] in ("yes", "no", "partly") for row in claims[2:]), claims


def test_report_is_rendered_from_the_stored_results_alone(quick_run, tmp_path):
    results = json.loads((quick_run / "results.json").read_text())
    text, _ = report.render(results, tmp_path)
    assert text == (quick_run / "RESULTS-paper.md").read_text()


def test_every_measured_cell_changes_when_the_measurements_do(quick_run, tmp_path):
    results = json.loads((quick_run / "results.json").read_text())
    original = _tables(report.render(results, tmp_path / "a")[0])
    renders = [_tables(report.render(_perturbed(results, seed), tmp_path / f"p{seed}")[0]) for seed in range(3)]
    unchanged = []
    for t, rows in enumerate(original):
        head = rows[0]
        for r, row in enumerate(rows[2:], start=2):
            for c, cell in enumerate(row):
                if c == 0 or "paper" in head[c] or not re.search(r"\d", cell):
                    continue
                if all(other[t][r][c] == cell for other in renders):
                    unchanged.append((head[c], row[0], cell))
    assert not unchanged, f"cells that no measurement moves (typed in?): {unchanged[:10]}"


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table: rows of cells, the header and separator included."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


JOIN_KEYS = {"share", "budget", "tier", "bandwidth", "window", "replaced", "seed"}  # rows are matched by these


def _perturbed(value, seed: int, path: str = ""):
    """Every number moved by a factor of 1.5-3 (and off zero), each leaf by its own (so equal
    measurements part); a number under a key that rows are matched by moves the same way
    wherever it appears, so those rows still match. Text is kept."""
    if isinstance(value, bool) or isinstance(value, str) or value is None:
        return value
    if isinstance(value, (int, float)):
        key = path.rsplit("/", 1)[-1]
        rng = random.Random(f"{seed}:{value!r}" if key in JOIN_KEYS else f"{seed}:{path}")
        moved = value * rng.uniform(1.5, 3)
        return int(moved) + 1 if isinstance(value, int) else moved + 0.01 * rng.uniform(1, 2)
    if isinstance(value, list):
        return [_perturbed(v, seed, f"{path}/{i}") for i, v in enumerate(value)]
    return {k: _perturbed(v, seed, f"{path}/{k}") for k, v in value.items()}
