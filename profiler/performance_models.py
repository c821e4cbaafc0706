"""The performance models of section 3.3: E_memory, E_latency and E_accuracy.

Pure functions of plain data (scored rows, a ``DeviceProfile``) and numpy; scikit-learn
fits them, and each fitted model is kept as its weights in JSON and evaluated here with
numpy, so a stored model needs neither pickle nor scikit-learn to predict.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from swapmoe.core.budget import MemoryModel
from swapmoe.core.device_profile import DeviceProfile
from swapmoe.profiler.configs import Configuration

HELD_OUT_PERCENT = 20
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)  # L2 penalties E_accuracy's network is cross-validated over
ENSEMBLE = 5  # networks fitted from different seeds, averaged for the planner's search


# --- E_memory -------------------------------------------------------------------------
def e_memory(memory: MemoryModel, config: Configuration) -> int:
    """Bytes the executor accounts for under ``config``: its own ``MemoryModel``, not a copy."""
    return memory.plan_bytes(config.experts_per_layer)


# --- E_accuracy -----------------------------------------------------------------------
def features(configs: Sequence[Configuration], num_experts: Sequence[int]) -> np.ndarray:
    """[configs, 2 x layers + 1]: the share of each layer's experts kept and its log (losing the
    last few experts of a layer costs far more than the first few), and updates per token
    (1 / update_frequency; 0 when the resident set never moves)."""
    kept = np.array([c.experts_per_layer for c in configs], dtype=float).reshape(len(configs), len(num_experts))
    return feature_arrays(kept, np.array([c.update_frequency for c in configs]), num_experts)


def feature_arrays(kept: np.ndarray, update_frequency: np.ndarray, num_experts: Sequence[int]) -> np.ndarray:
    """``features`` of many configurations given as arrays: kept [N, layers], update_frequency [N]."""
    share = np.asarray(kept, dtype=float) / np.asarray(num_experts, dtype=float)
    frequency = np.asarray(update_frequency, dtype=float)
    rate = np.divide(1.0, frequency, out=np.zeros_like(frequency), where=frequency > 0)
    return np.hstack([share, np.log(share), rate[:, None]])


def lower_is_better(workload: str) -> bool:
    return workload != "summarization"  # perplexity; Rouge-2 is higher-better


def _target(values: np.ndarray, workload: str) -> np.ndarray:
    """What the regressors fit: log perplexity (relative errors become absolute ones), Rouge-2 as is."""
    return np.log(values) if lower_is_better(workload) else values


def _untarget(values: np.ndarray, workload: str) -> np.ndarray:
    return np.exp(values) if lower_is_better(workload) else values


@dataclass(frozen=True, slots=True)
class AccuracyModel:
    """A fitted E_accuracy for one workload: a standardized input, one hidden ReLU layer and a
    linear output (``hidden`` empty: a plain linear model), on a standardized target."""

    workload: str
    num_experts: tuple[int, ...]
    x_mean: tuple[float, ...]
    x_scale: tuple[float, ...]
    weights: tuple[tuple[tuple[float, ...], ...], ...]  # per layer [inputs, outputs]
    biases: tuple[tuple[float, ...], ...]
    y_mean: float
    y_scale: float

    def predict(self, configs: Sequence[Configuration]) -> np.ndarray:
        return self._forward(features(configs, self.num_experts))

    def predict_arrays(self, kept: np.ndarray, update_frequency: np.ndarray) -> np.ndarray:
        """``predict`` for kept [N, layers] and update_frequency [N] (what a search evaluates)."""
        return self._forward(feature_arrays(kept, update_frequency, self.num_experts))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        x = (x - np.asarray(self.x_mean)) / np.asarray(self.x_scale)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ np.asarray(w) + np.asarray(b)
            if i < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
        return _untarget(x[:, 0] * self.y_scale + self.y_mean, self.workload)

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, body: dict) -> "AccuracyModel":
        def tuples(x):
            return tuple(tuples(v) for v in x) if isinstance(x, list) else x
        return cls(**{k: tuples(v) for k, v in body.items()})


@dataclass(frozen=True, slots=True)
class AccuracyEnsemble:
    """E_accuracy as the mean (in the target space: log perplexity) of networks fitted from
    different seeds. A search that maximises one network finds the plans that network is too
    optimistic about (the optimizer's curse); a mean of several is wrong in fewer places at once."""

    members: tuple[AccuracyModel, ...]

    @property
    def workload(self) -> str:
        return self.members[0].workload

    @property
    def num_experts(self) -> tuple[int, ...]:
        return self.members[0].num_experts

    def predict(self, configs: Sequence[Configuration]) -> np.ndarray:
        return self._mean([m.predict(configs) for m in self.members])

    def predict_arrays(self, kept: np.ndarray, update_frequency: np.ndarray) -> np.ndarray:
        return self._mean([m.predict_arrays(kept, update_frequency) for m in self.members])

    def _mean(self, predictions: list[np.ndarray]) -> np.ndarray:
        return _untarget(np.mean([_target(p, self.workload) for p in predictions], axis=0), self.workload)

    def to_json(self) -> list[dict]:
        return [m.to_json() for m in self.members]

    @classmethod
    def from_json(cls, body: list[dict]) -> "AccuracyEnsemble":
        return cls(tuple(AccuracyModel.from_json(m) for m in body))


def is_held_out(key: str) -> bool:
    """A fixed ``HELD_OUT_PERCENT`` of configurations, by a hash of their key, judge the fit."""
    return hashlib.sha256(key.encode()).digest()[0] * 100 < 256 * HELD_OUT_PERCENT


def fit_accuracy(rows: list[dict], workload: str, num_experts: Sequence[int], seed: int = 0,
                 hidden: int = 32) -> dict:
    """Fit E_accuracy (the paper's two fully connected layers with ReLU; its L2 penalty chosen by
    5-fold cross-validation on the training configurations), ``ENSEMBLE`` such networks from
    different seeds at that penalty, and a linear model, on the training configurations of
    ``rows``; report each on the held-out ones."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    configs = [Configuration(tuple(r["experts_per_layer"]), r["update_frequency"]) for r in rows]
    y = np.array([r["accuracy"][workload] for r in rows], dtype=float)
    held = np.array([is_held_out(c.key) for c in configs])
    if held.all() or (~held).sum() < 3:
        raise ValueError(f"{len(rows)} scored configurations are too few to fit E_accuracy; score more")
    x_scaler = StandardScaler().fit(features([c for c, h in zip(configs, held) if not h], num_experts))
    x_scaler.scale_[x_scaler.scale_ == 0] = 1.0
    t = _target(y[~held], workload)
    y_mean, y_scale = float(t.mean()), float(t.std() or 1.0)
    x_train = x_scaler.transform(features([c for c, h in zip(configs, held) if not h], num_experts))
    t_train = (t - y_mean) / y_scale
    network = MLPRegressor(hidden_layer_sizes=(hidden,), activation="relu", solver="lbfgs", max_iter=20_000,
                           random_state=seed)
    folds = min(5, len(t_train))
    search = GridSearchCV(network, {"alpha": ALPHAS}, cv=KFold(folds, shuffle=True, random_state=seed),
                          scoring="neg_mean_absolute_error").fit(x_train, t_train)
    mlp = search.best_estimator_
    members = [mlp] + [MLPRegressor(hidden_layer_sizes=(hidden,), activation="relu", solver="lbfgs", max_iter=20_000,
                                    alpha=search.best_params_["alpha"], random_state=seed + i).fit(x_train, t_train)
                       for i in range(1, ENSEMBLE)]
    linear = LinearRegression().fit(x_train, t_train)
    common = dict(workload=workload, num_experts=tuple(num_experts), x_mean=tuple(x_scaler.mean_),
                  x_scale=tuple(x_scaler.scale_), y_mean=y_mean, y_scale=y_scale)
    networks = [AccuracyModel(weights=tuple(map(_rows, m.coefs_)), biases=tuple(tuple(b) for b in m.intercepts_),
                              **common) for m in members]
    models = {
        "mlp": networks[0],
        "ensemble": AccuracyEnsemble(tuple(networks)),
        "linear": AccuracyModel(weights=(_rows(linear.coef_.reshape(-1, 1)),),
                                biases=((float(linear.intercept_),),), **common),
    }
    held_configs = [c for c, h in zip(configs, held) if h]
    report = {name: _errors(m.predict(held_configs), y[held]) for name, m in models.items()} if held.any() else {}
    return dict(workload=workload, trained_on=int((~held).sum()), held_out=int(held.sum()),
                alpha=float(search.best_params_["alpha"]),
                models={k: m.to_json() for k, m in models.items()}, held_out_error=report)


def _rows(matrix) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in np.asarray(matrix))


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict:
    relative = np.abs(predicted - measured) / np.maximum(np.abs(measured), 1e-12)
    return dict(mean_relative_error=float(relative.mean()), median_relative_error=float(np.median(relative)),
                max_relative_error=float(relative.max()),
                spearman=_spearman(predicted, measured))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation: what a search needs most is the order of configurations."""
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# --- E_latency ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LatencyModel:
    """E_latency of one device: the time between tokens when nothing is updated, plus what
    updates cost at a rate of updates per token, fitted monotone (isotonic) to the
    update-frequency sweep and scaled by the share of layers that can load at all (a layer
    keeping all its experts never does).

    The first term is the sweep's own baseline (generation through the executor's loop, never
    updating), else a decode step's compute: its dense part plus each layer's top-k experts at
    one token. Under masked gating every token still runs top-k experts, so how many are
    resident changes what updates cost, not the compute."""

    compute_ns: float  # dense part + top-k experts per layer, at one token
    base_ns: float  # between tokens without updates
    rate: tuple[float, ...]  # updates per token, ascending
    overhead_ns: tuple[float, ...]  # inter-token time above the sweep's no-update baseline
    sweep_loading_share: float  # share of layers that could load in the sweep's plan
    num_experts: tuple[int, ...]
    # A decode pass of each measured batch size, as a multiple of one sequence's (ascending rows,
    # starting at 1). Empty (an older profile): a pass costs as many times one as it has rows,
    # so rows buy no speed and a plan spends nothing on them it need not.
    batch_rows: tuple[int, ...] = ()
    batch_ratio: tuple[float, ...] = ()

    def inter_token_ns(self, config: Configuration) -> float:
        rate = 1.0 / config.update_frequency if config.update_frequency else 0.0
        overhead = float(np.interp(rate, self.rate, self.overhead_ns)) if self.rate else 0.0
        loading = np.mean([k < e for k, e in zip(config.experts_per_layer, self.num_experts)])
        scale = loading / self.sweep_loading_share if self.sweep_loading_share else 0.0
        return self.base_ns + overhead * scale

    def pass_ratio(self, rows) -> np.ndarray:
        """A decode pass of ``rows`` sequences (an array) over one sequence's: interpolated between
        the measured batch sizes, extended past the largest by its last slope."""
        rows = np.asarray(rows, dtype=float)
        if len(self.batch_rows) < 2:
            return np.maximum(rows, 1.0)
        x, y = np.asarray(self.batch_rows, dtype=float), np.asarray(self.batch_ratio)
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.where(rows <= x[-1], np.interp(rows, x, y), y[-1] + (rows - x[-1]) * slope)

    def tokens_per_second(self, config: Configuration) -> float:
        return 1e9 / self.inter_token_ns(config)

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, body: dict) -> "LatencyModel":
        return cls(body["compute_ns"], body["base_ns"], tuple(body["rate"]), tuple(body["overhead_ns"]),
                   body["sweep_loading_share"], tuple(body["num_experts"]), tuple(body.get("batch_rows", ())),
                   tuple(body.get("batch_ratio", ())))


def expert_ns_at(samples, tokens: int) -> float:
    """One expert's forward time at ``tokens`` tokens, interpolated between measured counts."""
    points = sorted((s.tokens, s.expert_forward_ns) for s in samples)
    return float(np.interp(tokens, [p[0] for p in points], [p[1] for p in points]))


def fit_latency(profile: DeviceProfile) -> LatencyModel:
    from sklearn.isotonic import IsotonicRegression

    num_experts = tuple(l.num_experts for l in profile.layout.layers)
    experts = sum(spec.top_k * expert_ns_at(layer.compute, 1)
                  for spec, layer in zip(profile.layout.layers, profile.layers))
    compute = float(profile.dense_forward_ns) + experts
    baseline = next((p.inter_token_ns for p in profile.sweep if p.update_frequency == 0), None)
    points = sorted((1.0 / p.update_frequency, p.inter_token_ns - baseline)
                    for p in profile.sweep if p.update_frequency) if baseline is not None else []
    if points:
        x = np.array([0.0] + [p[0] for p in points])
        y = np.array([0.0] + [p[1] for p in points])
        fitted = IsotonicRegression(y_min=0.0, increasing=True).fit(x, y).predict(x)
        rate, overhead = tuple(float(v) for v in x), tuple(float(v) for v in fitted)
    else:
        rate, overhead = (), ()
    loading = float(np.mean([k < e for k, e in zip(profile.sweep_experts_per_layer, num_experts)])) \
        if profile.sweep_experts_per_layer else 0.0
    batch = sorted((p.rows, p.step_ns) for p in profile.batch_decode if p.rows >= 1 and p.step_ns > 0)
    one = next((ns for rows, ns in batch if rows == 1), None)
    if one is not None and len(batch) > 1:
        # Fitted monotone too: more rows never make a pass cheaper (timing noise at small batches can).
        ratios = IsotonicRegression(increasing=True).fit([r for r, _ in batch], [ns / one for _, ns in batch])
        batch_rows = tuple(r for r, _ in batch)
        batch_ratio = tuple(float(max(1.0, v)) for v in ratios.predict([r for r, _ in batch]))
    else:
        batch_rows, batch_ratio = (), ()
    return LatencyModel(compute, float(baseline) if baseline is not None else compute, rate, overhead, loading,
                        num_experts, batch_rows, batch_ratio)


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured else math.inf
