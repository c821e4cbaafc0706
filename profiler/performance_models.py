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
from swapmoe.profiler.features import (configuration, feature_arrays, features, precision_indicators,
                                        scored_precisions)

HELD_OUT_PERCENT = 20
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)  # L2 penalties E_accuracy's network is cross-validated over
ENSEMBLE = 5  # networks fitted from different seeds, averaged for the planner's search


# --- E_memory -------------------------------------------------------------------------
def e_memory(memory: MemoryModel, config: Configuration) -> int:
    """Bytes the executor accounts for under ``config``: its own ``MemoryModel``, not a copy."""
    return memory.plan_bytes(config.experts_per_layer, precision=config.precision)


# --- E_accuracy -----------------------------------------------------------------------
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
    precisions: tuple[str, ...] = ()  # the lower precisions its features know (``features``); () before them

    def predict(self, configs: Sequence[Configuration]) -> np.ndarray:
        return self._forward(features(configs, self.num_experts, self.precisions))

    def predict_arrays(self, kept: np.ndarray, update_frequency: np.ndarray, precision: np.ndarray | None = None,
                       names: Sequence[str] = ("",)) -> np.ndarray:
        """``predict`` for kept [N, layers], update_frequency [N] and precision [N, layers] (indices
        into ``names``; None: the checkpoint's everywhere): what a search evaluates."""
        unknown = [n for n in names if n and n not in self.precisions]
        if precision is not None and unknown:
            raise ValueError(f"E_accuracy was not profiled with experts at {unknown} (it knows {list(self.precisions)})")
        at = None if precision is None or not self.precisions else \
            precision_indicators(precision, names, self.precisions)
        if at is None and self.precisions:
            at = np.zeros((len(kept), len(self.num_experts), len(self.precisions)), dtype=bool)
        return self._forward(feature_arrays(kept, update_frequency, self.num_experts, at))

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

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.members[0].precisions

    def predict(self, configs: Sequence[Configuration]) -> np.ndarray:
        return self._mean([m.predict(configs) for m in self.members])

    def predict_arrays(self, kept: np.ndarray, update_frequency: np.ndarray, precision: np.ndarray | None = None,
                       names: Sequence[str] = ("",)) -> np.ndarray:
        return self._mean([m.predict_arrays(kept, update_frequency, precision, names) for m in self.members])

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
                 hidden: int = 32, precisions: Sequence[str] = ()) -> dict:
    """Fit E_accuracy (the paper's two fully connected layers with ReLU; its L2 penalty chosen by
    5-fold cross-validation on the training configurations), ``ENSEMBLE`` such networks from
    different seeds at that penalty, and a linear model, on the training configurations of
    ``rows``; report each on the held-out ones (and on those with some layer at a lower
    precision alone). Its features know the lower precisions the rows scored (in the order of
    ``precisions``, the store's)."""
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    configs = [configuration(r) for r in rows]
    known = scored_precisions(rows, precisions)
    y = np.array([r["accuracy"][workload] for r in rows], dtype=float)
    held = np.array([is_held_out(c.key) for c in configs])
    if held.all() or (~held).sum() < 3:
        raise ValueError(f"{len(rows)} scored configurations are too few to fit E_accuracy; score more")
    x_scaler = StandardScaler().fit(features([c for c, h in zip(configs, held) if not h], num_experts, known))
    x_scaler.scale_[x_scaler.scale_ == 0] = 1.0
    t = _target(y[~held], workload)
    y_mean, y_scale = float(t.mean()), float(t.std() or 1.0)
    x_train = x_scaler.transform(features([c for c, h in zip(configs, held) if not h], num_experts, known))
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
                  x_scale=tuple(x_scaler.scale_), y_mean=y_mean, y_scale=y_scale, precisions=known)
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
    lowered = np.array([bool(c.precision) for c in configs]) & held
    out = dict(workload=workload, trained_on=int((~held).sum()), held_out=int(held.sum()),
               alpha=float(search.best_params_["alpha"]),
               models={k: m.to_json() for k, m in models.items()}, held_out_error=report)
    if known and lowered.any():  # the held-out configurations with some layer below the checkpoint's precision
        lowered_configs = [c for c, h in zip(configs, lowered) if h]
        out.update(held_out_with_precision=int(lowered.sum()),
                   held_out_error_with_precision={name: _errors(m.predict(lowered_configs), y[lowered])
                                                  for name, m in models.items()})
    return out


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
    # The lower precisions the executor keeps experts at; per precision, a decode pass with every
    # layer at it over one at the checkpoint's (1.0 where not measured: an older profile predicts
    # every precision at the checkpoint's speed) and an expert's bytes at it over the checkpoint's
    # (the share of an update's or a miss's load time it takes).
    precision_names: tuple[str, ...] = ()
    precision_ratio: tuple[float, ...] = ()
    precision_bytes: tuple[float, ...] = ()

    def inter_token_ns(self, config: Configuration) -> float:
        rate = 1.0 / config.update_frequency if config.update_frequency else 0.0
        overhead = float(np.interp(rate, self.rate, self.overhead_ns)) if self.rate else 0.0
        names = ("", *self.precision_names)
        codes = np.array([[names.index(p) if p in names else 0 for p in config.precisions]])
        compute, loads = self.precision_factors(codes, names)
        loading = np.mean([k < e for k, e in zip(config.experts_per_layer, self.num_experts)] * loads[0])
        scale = loading / self.sweep_loading_share if self.sweep_loading_share else 0.0
        return self.base_ns * float(compute[0]) + overhead * scale

    def precision_factors(self, codes: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For precision codes [N, layers] (indices into ``names``): each plan's pass time over one at
        the checkpoint's precision [N] (each layer adds its share of the all-layers difference: layers
        alike) and each layer's load time over the checkpoint's [N, layers] (bytes read)."""
        return precision_factors(codes, names, dict(zip(self.precision_names,
                                                        zip(self.precision_ratio, self.precision_bytes))))

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
                   tuple(body.get("batch_ratio", ())), tuple(body.get("precision_names", ())),
                   tuple(body.get("precision_ratio", ())), tuple(body.get("precision_bytes", ())))


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
    names, ratio, nbytes = precision_tables(profile)
    sweep = ("", *names)
    codes = np.array([[sweep.index(p) if p in sweep else 0 for p in profile.sweep_precision or
                       ("",) * len(num_experts)]])
    at_sweep, sweep_loads = precision_factors(codes, sweep, dict(zip(names, zip(ratio, nbytes))))
    # The decode step and the sweep ran at the sweep's precision: the baseline is the checkpoint's.
    compute, baseline = compute / float(at_sweep[0]), None if baseline is None else baseline / float(at_sweep[0])
    loading = float(np.mean([k < e for k, e in zip(profile.sweep_experts_per_layer, num_experts)] * sweep_loads[0])) \
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
                        num_experts, batch_rows, batch_ratio, names, ratio, nbytes)


def precision_tables(profile: DeviceProfile) -> tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    """The layout's lower precisions, each one's decode pass over the checkpoint's (1.0 unmeasured)
    and its expert bytes over the checkpoint's (the mean over layers)."""
    names = profile.layout.precisions
    step = {p.precision: p.step_ns for p in profile.precision_points if p.step_ns > 0}
    ratio = tuple(step[n] / step[""] if "" in step and n in step else 1.0 for n in names)
    nbytes = tuple(float(np.mean([l.bytes_at(n) / l.bytes_per_expert for l in profile.layout.layers])) for n in names)
    return names, ratio, nbytes


def precision_factors(codes: np.ndarray, names: Sequence[str],
                      measured: dict[str, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``LatencyModel.precision_factors`` from a table precision -> (pass ratio, bytes ratio)."""
    table = np.array([measured.get(n, (1.0, 1.0)) for n in names], dtype=float).reshape(len(names), 2)
    codes = np.asarray(codes, dtype=np.int64)
    return 1.0 + (table[:, 0][codes] - 1.0).mean(axis=1), table[:, 1][codes]


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured else math.inf
