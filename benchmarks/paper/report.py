"""The paper report: a header saying what ran where, each section's claims beside what we
measured, then its tables and figures. A pure function of the stored results."""

from __future__ import annotations

import importlib
from pathlib import Path

from benchmarks.paper.figures import Figures
from benchmarks.paper.tables import table

# In the report's order; each module has measure(ctx) -> dict, render(results, figures) -> list[str]
# and claims(results) -> [(claim, what the paper measured, what we measured, holds)].
SECTIONS = ("budgets", "served", "paper_size", "slow_tier", "ablations", "plans", "locality")
CLAIM_HEAD = ("claim (paper section 4)", "paper", "measured here", "holds here?")


def section(name: str):
    return importlib.import_module(f"benchmarks.paper.{name}")


def render(results: dict, directory: Path) -> tuple[str, list[str]]:
    """The report's Markdown, and the figures it drew under ``directory``/figures."""
    figures = Figures(directory / "figures")
    run = results["run"]
    present = [n for n in SECTIONS if n in results["sections"]]
    claims = [c for n in present for c in section(n).claims(results["sections"][n])]
    lines = [
        "# SwapMoE's evaluation, reproduced on this project's models",
        "",
        f"`python -m benchmarks.paper{' --quick' if run['quick'] else ''}` at {run['git']}, {run['started']}: "
        f"{run['machine']}, torch {run['torch']}, {run['threads']} thread(s); "
        f"{run['seconds']:.0f} s of measuring in all. Every number below was measured by it "
        "(`results.json` beside this file holds them; the report is rendered from it alone)"
        + _measured_at(run) + ".",
        "",
        "What differs from the paper's setting: a 2-core x86 CPU with no accelerator instead of a Jetson "
        "(so \"fast memory\" is process memory and the slow tier is the expert store on disk, or that store "
        "read at a capped bandwidth); the bundled 21 MiB language model (6 MoE layers x 16 experts) and the "
        "bundled Switch summarizer instead of SwitchTransformers and GPT-MoE of 0.3-8 GiB; held-out text of "
        "our own corpus (code, prose, manual pages) instead of the paper's datasets.",
        "",
        "## The paper's claims against our measurements",
        "",
        *table(CLAIM_HEAD, claims),
    ]
    for name in present:
        lines += section(name).render(results["sections"][name], figures)
    return "\n".join(lines) + "\n", figures.made


def _measured_at(run: dict) -> str:
    """Which commit measured each section, where a partial run replaced some of them."""
    at = run.get("measured_at", {})
    if len(set(at.values())) <= 1:
        return ""
    return "; sections measured at: " + ", ".join(f"{n} {g}" for n, g in at.items())
