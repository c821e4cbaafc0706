"""Plots of stored profiles (matplotlib, written as PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from swapmoe.core.device_profile import DeviceProfile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_plot(rows: list[dict], workload: str, num_experts: list[int], path: Path) -> Path:
    """Accuracy against the mean share of experts kept per layer, coloured by how uneven the
    allocation is: configurations of one size can differ a lot."""
    plt = _pyplot()
    kept = np.array([r["experts_per_layer"] for r in rows], dtype=float) / np.asarray(num_experts)
    accuracy = np.array([r["accuracy"][workload] for r in rows])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = ax.scatter(kept.mean(axis=1) * np.mean(num_experts), accuracy, c=kept.std(axis=1), cmap="viridis", s=14)
    fig.colorbar(points, ax=ax, label="spread of kept share across layers (std)")
    ax.set_xlabel("experts kept per layer (mean)")
    ax.set_ylabel("perplexity" if workload != "summarization" else "Rouge-2")
    if workload != "summarization":
        ax.set_yscale("log")
    ax.set_title(f"accuracy profile: {workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plot(profile: DeviceProfile, path: Path) -> Path:
    """Inter-token latency against update frequency, the inflection point marked."""
    plt = _pyplot()
    points = sorted((p for p in profile.sweep if p.update_frequency), key=lambda p: p.update_frequency)
    baseline = next((p for p in profile.sweep if p.update_frequency == 0), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p.update_frequency for p in points], [p.inter_token_ns / 1e6 for p in points], "o-", label="measured")
    if baseline:
        ax.axhline(baseline.inter_token_ns / 1e6, color="grey", ls="--", label="never updating")
    ax.axvline(profile.inflection_update_frequency, color="red", label=f"inflection: {profile.inflection_update_frequency}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("update frequency (passes between updates; left = more often)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
