"""What E_accuracy sees of a configuration (paper section 3.3): its features, and the
configurations a profile's scored rows stand for. Pure numpy."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from swapmoe.profiler.configs import Configuration


def configuration(row: dict) -> Configuration:
    """The configuration a row of ``scores.jsonl`` scored (rows before precisions: the checkpoint's)."""
    return Configuration(tuple(row["experts_per_layer"]), row["update_frequency"], tuple(row.get("precision", ())))


def scored_precisions(rows: list[dict], order: Sequence[str] = ()) -> tuple[str, ...]:
    """The lower precisions ``rows`` scored some layer at: in ``order`` (the store's), then by name."""
    seen = {p for r in rows for p in r.get("precision", ()) if p}
    return tuple(p for p in order if p in seen) + tuple(sorted(seen - set(order)))


def features(configs: Sequence[Configuration], num_experts: Sequence[int],
             precisions: Sequence[str] = ()) -> np.ndarray:
    """[configs, 2 x layers + 1 + layers x P]: the share of each layer's experts kept and its log
    (losing the last few experts of a layer costs far more than the first few), updates per token
    (1 / update_frequency; 0 when the resident set never moves), and per layer one indicator for
    each of the P lower ``precisions`` (none: a model profiled without them).

    Precision as indicators, not as bits per weight: the lower precisions lose accuracy by
    different laws (bfloat16 rounds mantissas, int8 scales each row, int4 each group of 64 with a
    zero point), so their cost is no smooth function of the bits and is learned for each one and
    each layer; the hidden layer learns how it combines with the share kept."""
    kept = np.array([c.experts_per_layer for c in configs], dtype=float).reshape(len(configs), len(num_experts))
    names = ("", *precisions)
    codes = np.array([[_code(names, p) for p in c.precisions] for c in configs], dtype=np.int64)
    return feature_arrays(kept, np.array([c.update_frequency for c in configs]), num_experts,
                          precision_indicators(codes.reshape(len(configs), len(num_experts)), names, precisions))


def _code(names: Sequence[str], precision: str) -> int:
    if precision not in names:
        raise ValueError(f"E_accuracy was not profiled with experts at {precision!r} (it knows {list(names[1:])})")
    return names.index(precision)


def precision_indicators(codes: np.ndarray, names: Sequence[str], precisions: Sequence[str]) -> np.ndarray:
    """[N, layers, P]: whether each layer of codes [N, layers] (indices into ``names``) is at each
    of ``precisions``."""
    column = np.array([precisions.index(n) if n in precisions else -1 for n in names], dtype=np.int64)
    return column[np.asarray(codes, dtype=np.int64)][..., None] == np.arange(len(precisions))


def feature_arrays(kept: np.ndarray, update_frequency: np.ndarray, num_experts: Sequence[int],
                   at_precision: np.ndarray | None = None) -> np.ndarray:
    """``features`` of many configurations given as arrays: kept [N, layers], update_frequency [N],
    at_precision [N, layers, P] (``precision_indicators``; None: a model without precisions)."""
    share = np.asarray(kept, dtype=float) / np.asarray(num_experts, dtype=float)
    frequency = np.asarray(update_frequency, dtype=float)
    rate = np.divide(1.0, frequency, out=np.zeros_like(frequency), where=frequency > 0)
    parts = [share, np.log(share), rate[:, None]]
    if at_precision is not None and at_precision.size:
        parts.append(at_precision.reshape(len(share), -1).astype(float))
    return np.hstack(parts)
