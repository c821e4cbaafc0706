"""Routing statistics that test SwapMoE's premise (paper section 2.2): experts specialize by
domain, the experts a token uses are likely used by the next token and the next input, and a
document's routing concentrates on few experts.

Pure numpy over one layer's routing: ``choices`` is an int array [tokens, k] of chosen experts.
"""

from __future__ import annotations

import numpy as np


def usage(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of routed assignments that went to each expert (sums to 1)."""
    counts = np.bincount(choices.reshape(-1), minlength=num_experts)[:num_experts].astype(float)
    return counts / max(counts.sum(), 1)


def membership(choices: np.ndarray, num_experts: int) -> np.ndarray:
    """[tokens, experts] booleans: which experts each token used."""
    member = np.zeros((len(choices), num_experts), dtype=bool)
    np.put_along_axis(member, choices, True, axis=1)
    return member


def repeat_rate(choices: np.ndarray, num_experts: int) -> float:
    """Mean share of a token's experts that the next token also uses."""
    member = membership(choices, num_experts)
    if len(member) < 2:
        return float("nan")
    return float((member[1:] & member[:-1]).sum(axis=1).mean() / choices.shape[1])


def chance_repeat_rate(choices: np.ndarray, num_experts: int) -> float:
    """The same rate if consecutive tokens chose independently with the observed per-expert
    frequencies: sum_e P(e used)^2 / k."""
    p = membership(choices, num_experts).mean(axis=0)
    return float((p ** 2).sum() / choices.shape[1])


def intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Histogram intersection of two usage distributions: 1 identical, 0 disjoint."""
    return float(np.minimum(a, b).sum())


def consecutive_input_similarity(usages: list[np.ndarray]) -> float:
    """Mean intersection between the expert usage of consecutive inputs of a stream."""
    return float(np.mean([intersection(a, b) for a, b in zip(usages, usages[1:])]))


def random_pair_similarity(usages: list[np.ndarray], seed: int = 0, pairs: int = 2000) -> float:
    """Mean intersection between inputs drawn at random from the whole pool (the chance level)."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(usages), (2, pairs))
    keep = i != j
    return float(np.mean([intersection(usages[a], usages[b]) for a, b in zip(i[keep], j[keep])]))


def top_share(dist: np.ndarray, fraction: float = 0.25) -> float:
    """Share of assignments covered by the most-used ``fraction`` of experts (0.25 under uniform)."""
    top = max(1, int(round(len(dist) * fraction)))
    return float(np.sort(dist)[::-1][:top].sum())


def effective_experts(dist: np.ndarray) -> float:
    """exp(entropy): how many equally used experts would give the same spread."""
    p = dist[dist > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def jensen_shannon(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two usage distributions (0 same, 1 disjoint)."""
    m = (a + b) / 2

    def kl(p, q):
        mask = p > 0
        return float((p[mask] * np.log2(p[mask] / q[mask])).sum())

    return 0.5 * kl(a, m) + 0.5 * kl(b, m)
