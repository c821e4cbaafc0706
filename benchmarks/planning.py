"""The planner's genetic search (paper section 3.4.2): measured truth, search time, optimality.

    python -m benchmarks.planning                      # all parts (~20 min on 2 cores); writes
                                                       # benchmarks/RESULTS-planning.{md,json}, plots/planning-truth.png
    python -m benchmarks.planning --parts timing       # one part again; the others are kept from the last run
    python -m benchmarks.planning --parts --findings F # only rewrite the report ("What this shows" from F)
    python -m benchmarks.planning --quick              # a smoke run of every part; prints, writes nothing

1. ``truth``: the bundled LM (6 MoE layers x 16 experts) with its stored profiles, at 25, 50
   and 75% of its experts. The searched plan (virtual experts only, the planner's default
   latency target: E_latency at the device's inflection point) against the even split and
   random allocations of the same number of experts at the same update frequency, all scored
   by the executor's own runtime (``Scorer``: masked gating, importance, updates) on the
   *judging* half of the data, which the performance models never saw. Also what the full
   strategy-aware search picks at each budget.
   ``crosscheck``: the searched, even and best random plans scored again on the profiling set
   E_accuracy was fitted on (model error or data shift?).
   ``latency``: E_latency of the picks against their inter-token time through a real Engine.
2. ``timing``: ``search()`` with the default ``SearchSettings()`` on the bundled LM (its real
   models) and on a Mixtral-8x7B- and a DeepSeek-V3-shaped layout (synthetic models), the miss
   curves' one-off cost, and the bundled LM's frontier.
3. ``optimum``: the search against ``exhaustive()`` on random small synthetic spaces, and on
   the bundled LM's masked-gating plans at the searched update frequency (16^6 per frequency).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.core.plan import Strategy
from swapmoe.planner_service import frontier, profiles
from swapmoe.planner_service.objectives import Objectives, inflection_latency_ns
from swapmoe.planner_service.search import Found, SearchSettings, exhaustive, search
from swapmoe.profiler.configs import Configuration, allocate
from swapmoe.profiler.models import AccuracyModel, LatencyModel
from swapmoe.profiler.report import load_device
from swapmoe.profiler.workloads import MIX, ProfilingSet

from benchmarks.planning_report import (ACCURACY_DIR, DEVICE_DIR, GIB, HERE, MIB, plot_truth, predicted_mix,
                                        write_report)

SHARES = (0.25, 0.5, 0.75)  # of all experts: the budgets every part plans for
MG = Strategy.MASKED_GATING
PARTS = ("truth", "crosscheck", "latency", "timing", "optimum")
PROFILING_SET = ProfilingSet("lm", texts=3, tokens=256)  # what the stored accuracy profile was scored on


# --- the bundled LM's objectives, budgets and allocations -----------------------------------
@dataclass(frozen=True)
class Bundled:
    """The planner's objectives for the bundled LM on the benchmark machine, per workload."""

    objectives: dict[str, Objectives]
    memory: MemoryModel
    inflection: int
    target_ns: float  # the planner's default latency target
    sweep_experts: tuple[int, ...]  # the device profile's no-update baseline ran at this residency
    single: Objectives | None  # the mix objectives with one network for E_accuracy (None: the planner's is one)
    provenance: dict

    @property
    def mix(self) -> Objectives:
        return self.objectives[MIX]

    @property
    def model_name(self) -> str:
        members = getattr(self.mix.accuracy, "members", ())
        return f"ensemble of {len(members)} networks" if len(members) > 1 else "one network"

    @property
    def capacity(self) -> tuple[int, ...]:
        return self.mix.num_experts

    def masked(self, frequencies: tuple[int, ...] | None = None, single: bool = False) -> Objectives:
        """The mix objectives restricted to virtual experts (and to ``frequencies``); with
        ``single``, E_accuracy's first network alone."""
        extra = dict(update_frequencies=frequencies) if frequencies else {}
        return dataclasses.replace(self.single if single else self.mix, strategies=(MG,), **extra)

    def searches(self) -> dict[str, bool]:
        """The searches compared: role -> single network or not."""
        return {"searched": False, **({"searched, one network": True} if self.single else {})}

    def predict(self, config: Configuration) -> dict[str, float]:
        """E_accuracy of a masked-gating configuration, per workload."""
        return {w: float(o.predict_one(MG, config.update_frequency, config.experts_per_layer).accuracy)
                for w, o in self.objectives.items()}

    def predict_single(self, config: Configuration) -> float | None:
        """The mix E_accuracy of one network alone (None: the planner's is one network)."""
        if self.single is None:
            return None
        return float(self.single.predict_one(MG, config.update_frequency, config.experts_per_layer).accuracy)


def load_bundled() -> Bundled:
    accuracy = profiles.load_accuracy(ACCURACY_DIR)
    device = load_device(DEVICE_DIR, accuracy.fingerprint)
    memory = MemoryModel(device.layout, Reserve())
    objectives = profiles.objectives(accuracy, device, memory)
    target = inflection_latency_ns(objectives[MIX].latency, device.inflection_update_frequency)
    members = getattr(objectives[MIX].accuracy, "members", ())
    single = dataclasses.replace(objectives[MIX], accuracy=members[0]) if len(members) > 1 else None
    body = (ACCURACY_DIR / "e_accuracy.json").read_bytes()
    provenance = dict(e_accuracy_sha256=hashlib.sha256(body).hexdigest()[:16], git=_git_state())
    return Bundled(objectives, memory, device.inflection_update_frequency, target, device.sweep_experts_per_layer,
                   single, provenance)


def _git_state() -> str:
    """The commit, and whether the planner or profiler had uncommitted changes."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "planner_service", "profiler", "core", str(ACCURACY_DIR))
    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")


def experts_at(share: float, capacity) -> int:
    return round(share * sum(capacity))


def even(total: int, capacity) -> tuple[int, ...]:
    return allocate(total, np.ones(len(capacity)), capacity)


def budget_for(memory: MemoryModel, total: int) -> int:
    """The bytes of ``total`` experts (the even split's; equal-sized experts: any split's)."""
    return memory.plan_bytes(even(total, [l.num_experts for l in memory.layout.layers]))


def random_allocations(total: int, capacity, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` splits of ``total`` experts as ``profiler.configs.sample`` draws them: Dirichlet
    shares whose concentration is log-uniform in 0.1-30, through ``allocate``."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, total, i])
        shares = rng.dirichlet(np.full(len(capacity), 10 ** rng.uniform(-1, np.log10(30))))
        out.append(allocate(total, shares, capacity))
    return out


# --- part 1: the truth test -----------------------------------------------------------------
def truth(b: Bundled, judging: ProfilingSet, randoms: int, seed: int) -> dict:
    """Every plan of every budget scored with the real runtime on the judging set."""
    budgets = []
    for share in SHARES:
        total = experts_at(share, b.capacity)
        budget = budget_for(b.memory, total)
        found = {role: search(b.masked(single=single), budget, b.target_ns) for role, single in b.searches().items()}
        chosen = search(b.mix, budget, b.target_ns)
        f = found["searched"].update_frequency  # the planner's
        plans = {role: Configuration(x.experts_per_layer, x.update_frequency) for role, x in found.items()}
        plans["even"] = Configuration(even(total, b.capacity), f)
        plans.update({f"random {i}": Configuration(k, f)
                      for i, k in enumerate(random_allocations(total, b.capacity, randoms, seed))})
        if chosen.strategy is MG:
            plans["strategy-aware"] = Configuration(chosen.experts_per_layer, chosen.update_frequency)
        budgets.append(dict(share=share, experts=total, budget_bytes=budget, plans=plans,
                            searched={role: x.to_json() for role, x in found.items()}, strategy_aware=chosen.to_json()))
    reference = Configuration(b.capacity, 0)
    scores = score_all([reference] + [c for row in budgets for c in row["plans"].values()], judging)
    full = scores[reference.key]
    out = []
    for row in budgets:
        plans = {role: dict(key=c.key, experts_per_layer=list(c.experts_per_layer), update_frequency=c.update_frequency,
                            predicted=b.predict(c), predicted_one_network=b.predict_single(c),
                            measured=scores[c.key]["accuracy"], seconds=scores[c.key]["seconds"])
                 for role, c in row.pop("plans").items()}
        if row["strategy_aware"]["strategy"] == Strategy.ON_DEMAND.value:  # exact: the full model's output
            plans["strategy-aware"] = dict(key="on_demand", experts_per_layer=row["strategy_aware"]["experts_per_layer"],
                                           update_frequency=0, predicted={w: o.reference_accuracy for w, o in
                                                                          b.objectives.items()},
                                           measured=full["accuracy"], exact=True)
        out.append(dict(row, plans=plans, summary={role: summarise(plans, role) for role in b.searches()}))
    return dict(judging_set=judging.name, judging=dataclasses.asdict(judging), randoms=randoms, seed=seed,
                model=b.model_name, provenance=b.provenance,
                inflection=b.inflection, target_ns=b.target_ns, full_model=full["accuracy"],
                profiling_reference={w: o.reference_accuracy for w, o in b.objectives.items()},
                budgets=out, configurations_scored=len(scores),
                scoring_seconds=round(sum(s["seconds"] for s in scores.values()), 1))


def score_all(configs: list[Configuration], profiling_set: ProfilingSet) -> dict[str, dict]:
    """Accuracy per workload of each distinct configuration, scored one after another."""
    from transformers.utils import logging as hf_logging

    from swapmoe.models.bundled import LM_DIR
    from swapmoe.profiler.scoring import Scorer

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    unique = list({c.key: c for c in configs}.values())
    scorer = Scorer(LM_DIR, profiling_set)
    try:
        scores = {}
        for config in tqdm(unique, desc=f"scoring on {profiling_set.name}", unit="config"):
            s = scorer.score(config)
            scores[config.key] = dict(accuracy=s.accuracy, seconds=round(s.seconds, 2))
        return scores
    finally:
        scorer.close()


def summarise(plans: dict[str, dict], searched: str) -> dict:
    """Measured mix perplexity of the searched plan ``searched`` against the even and random
    splits of its budget (the other searched plan is not among them)."""
    mix = {role: p["measured"][MIX] for role, p in plans.items()
           if role == searched or role == "even" or role.startswith("random")}
    randoms = sorted(v for role, v in mix.items() if role.startswith("random"))
    others = {role: v for role, v in mix.items() if role != searched}
    best_other = min(others, key=others.get)
    ranked = sorted(mix.values())
    predicted = np.array([predicted_mix(plans[r], searched) for r in mix])
    measured = np.array(list(mix.values()))
    relative = np.abs(predicted - measured) / measured
    return dict(searched=mix[searched], even=mix["even"], random_best=randoms[0] if randoms else None,
                random_median=statistics.median(randoms) if randoms else None, best_other=best_other,
                best_other_value=others[best_other], searched_is_best=mix[searched] < others[best_other],
                margin=(others[best_other] - mix[searched]) / mix[searched],
                rank=ranked.index(mix[searched]) + 1, plans_compared=len(mix),
                prediction_mean_relative_error=float(relative.mean()),
                prediction_spearman=spearman(predicted, measured))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else float("nan")


def crosscheck(b: Bundled, t: dict) -> dict:
    """The searched plan, the even split and the best random split of each budget (by the
    truth test's measurement) scored again on the *profiling* set E_accuracy was fitted on:
    whether the searched plan loses on the judging data because the model is wrong about it,
    or because the two halves of the data disagree."""
    profiled = {json.loads(line)["key"] for line in (ACCURACY_DIR / "scores.jsonl").read_text().splitlines() if line}
    picks = []
    for row in t["budgets"]:
        plans = row["plans"]
        best = min((r for r in plans if r.startswith("random")), key=lambda r: plans[r]["measured"][MIX])
        picks += [(row["experts"], role, plans[role]) for role in (*row["summary"], "even", best)]
    configs = [Configuration(tuple(p["experts_per_layer"]), p["update_frequency"]) for _, _, p in picks]
    full = Configuration(b.capacity, 0)
    scores = score_all([full] + configs, PROFILING_SET)
    out = [dict(experts=n, role=role, key=c.key, predicted=p["predicted"][MIX],
                predicted_one_network=p.get("predicted_one_network"), judging=p["measured"][MIX],
                profiling=scores[c.key]["accuracy"][MIX], profiling_domains=scores[c.key]["accuracy"],
                in_accuracy_profile=c.key in profiled)
           for (n, role, p), c in zip(picks, configs)]
    return dict(profiling_set=PROFILING_SET.name, profile_configurations=len(profiled),
                full_model=scores[full.key]["accuracy"], plans=out)


# --- part 1b: the predicted latency of the picks, measured -----------------------------------
def latency_check(b: Bundled, rounds: int, tokens: int = 64) -> dict:
    """Inter-token time of the searched plans through a real ``Engine`` (as the device profile
    measured it), against E_latency: per budget the masked-gating plan and the strategy-aware
    pick, plus the profile's no-update baseline to see how fast the machine runs now."""
    from transformers.utils import logging as hf_logging

    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.models.bundled import LM_DIR
    from swapmoe.profiler.workloads import rows

    hf_logging.set_verbosity_error()
    baseline = Found(MG, 0, b.sweep_experts, b.mix.predict_one(MG, 0, b.sweep_experts), 0, MIX, True, 0)
    plans = [("baseline", "no updates", baseline)]
    for share in SHARES:
        budget = budget_for(b.memory, experts_at(share, b.capacity))
        plans.append((f"{share:.0%}", "masked gating", search(b.masked(), budget, b.target_ns)))
        plans.append((f"{share:.0%}", "strategy-aware", search(b.mix, budget, b.target_ns)))
    measured = {i: [] for i in range(len(plans))}
    loads = {i: [] for i in range(len(plans))}
    with Engine(EngineConfig(LM_DIR, 256 << 20, node_id="bench-planning")) as engine:
        prompts = [engine.tokenize(rows(d, "judging")[0]["text"])[:32] for d in ("code", "prose", "manual")]
        version = engine.plan.version
        for _ in tqdm(range(rounds), desc="inter-token time, plans interleaved", unit="round"):
            for i, (_, _, found) in enumerate(plans):
                version += 1
                assert engine.apply_plan(found.plan(version, "bench")).accepted
                _inter_token_ns(engine, prompts[0], tokens)  # untimed: the loads a new plan starts settle
                before = engine.load_counters()
                for prompt in prompts:
                    measured[i].append(_inter_token_ns(engine, prompt, tokens))
                loads[i].append((engine.load_counters() - before).loads / (len(prompts) * tokens))
    drift = statistics.median(measured[0]) / baseline.predicted.inter_token_ns
    out = []
    for i, (budget, kind, found) in enumerate(plans):
        value = statistics.median(measured[i])
        out.append(dict(budget=budget, kind=kind, strategy=found.strategy.value, update_frequency=found.update_frequency,
                        experts_per_layer=list(found.experts_per_layer), predicted_ns=found.predicted.inter_token_ns,
                        measured_ns=value, error=(found.predicted.inter_token_ns - value) / value,
                        error_drift_corrected=(found.predicted.inter_token_ns * drift - value) / value,
                        loads_per_token=statistics.median(loads[i]),
                        predicted_misses_per_token=float(b.mix.misses_per_token(np.array([found.experts_per_layer]))[0])
                        if found.strategy is Strategy.ON_DEMAND else None))
    return dict(rounds=rounds, tokens=tokens, prompts=3, drift=drift, target_ns=b.target_ns, load_ns=b.mix.load_ns,
                plans=out)


def _inter_token_ns(engine, prompt: tuple[int, ...], tokens: int) -> float:
    """Mean time between decoded tokens of one greedy generation, as its client sees them."""
    from swapmoe.executor.generation import GenerationRequest

    request = GenerationRequest(prompt, max_new_tokens=tokens)
    stamps = [time.perf_counter_ns() for chunk in engine.generate(request) for _ in chunk.token_ids]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


# --- part 2: search time --------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A real model's MoE shape, for synthetic objectives."""

    name: str
    layers: int
    experts: int
    top_k: int
    bytes_per_expert: int
    dense_bytes: int
    kv_cache_bytes: int
    base_ns: float  # synthetic time between tokens without updates
    load_bytes_per_second: float  # synthetic tier for on-demand misses


SHAPES = (
    # 8 x 3 x 4096 x 14336 fp16 per layer; ~1.6 B dense parameters in fp16; 4 K tokens of KV cache.
    Shape("Mixtral-8x7B-shaped", 32, 8, 2, 336 * MIB, 3 * GIB, 512 * MIB, 60e6, 2 * GIB),
    # 3 x 7168 x 2048 fp8 per routed expert; ~17 B other parameters in fp8; MLA's small KV cache.
    Shape("DeepSeek-V3-shaped", 58, 256, 8, 42 * MIB, 16 * GIB, 1 * GIB, 80e6, 2 * GIB),
)


def synthetic_objectives(shape: Shape, seed: int = 0, hidden: int = 32) -> Objectives:
    """E_memory of the shape; E_accuracy a network with random weights (as the tests build it,
    first layer scaled by 1/sqrt(inputs) so wide layouts stay in range); E_latency the tests'
    overhead curve scaled to ``base_ns``; a Zipf-like (1/rank) expert histogram per layer."""
    rng = np.random.default_rng(seed)
    experts = (shape.experts,) * shape.layers
    layout = ModelLayout("synthetic", shape.name, tuple(LayerLayout(i, f"layers.{i}", shape.experts, shape.top_k,
                                                                    shape.bytes_per_expert)
                                                        for i in range(shape.layers)), shape.dense_bytes, "float16")
    inputs = 2 * shape.layers + 1
    accuracy = AccuracyModel(MIX, experts, (0.0,) * inputs, (1.0,) * inputs,
                             (tuple(map(tuple, rng.normal(size=(inputs, hidden)) / math.sqrt(inputs))),
                              tuple(map(tuple, rng.normal(size=(hidden, 1)) / math.sqrt(hidden)))),
                             (tuple(rng.normal(size=hidden)), (0.0,)), y_mean=2.5, y_scale=0.5)
    overhead = tuple(shape.base_ns * x for x in (0.0, 0.01, 0.02, 0.06, 0.15, 0.3))
    latency = LatencyModel(shape.base_ns, shape.base_ns, (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), overhead, 1.0,
                           experts)
    zipf = 1.0 / np.arange(1, shape.experts + 1)
    histogram = tuple(tuple(rng.permutation(zipf / zipf.sum())) for _ in range(shape.layers))
    memory = MemoryModel(layout, Reserve(kv_cache_bytes=shape.kv_cache_bytes))
    load_ns = shape.bytes_per_expert / shape.load_bytes_per_second * 1e9
    return Objectives(MIX, memory, accuracy, latency, reference_accuracy=math.exp(2.5 - 1.0), histogram=histogram,
                      load_ns=load_ns)


def timed(fn, runs: int):
    """(result of the last run, wall seconds per run, process CPU seconds per run)."""
    walls, cpus, result = [], [], None
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, walls, cpus


def timing(b: Bundled, runs: int, frontier_build: bool = True) -> dict:
    load_before = os.getloadavg()
    models = [(f"bundled LM (its profiles; E_accuracy {b.model_name})", b.mix, b.target_ns)]
    if b.single:
        models.append(("bundled LM (E_accuracy one network)", b.single, b.target_ns))
    for shape in SHAPES:
        obj = synthetic_objectives(shape)
        models.append((shape.name, obj, inflection_latency_ns(obj.latency, 16)))
    out = []
    for name, obj, target in models:
        fresh = dataclasses.replace(obj)  # no miss curves cached yet
        _, curve_wall, _ = timed(lambda: fresh.miss_curves, 1)
        rows = []
        for share in SHARES:
            total = experts_at(share, obj.num_experts)
            budget = budget_for(obj.memory, total)
            found, walls, cpus = timed(lambda: search(fresh, budget, target, SearchSettings()), runs)
            rows.append(dict(share=share, experts=total, budget_bytes=budget, wall_seconds=walls, cpu_seconds=cpus,
                             median_seconds=statistics.median(walls), found=found.to_json()))
            print(f"  {name} at {share:.0%}: median {statistics.median(walls):.2f} s "
                  f"({found.strategy.value}, f={found.update_frequency}, {found.evaluated} evaluated)")
        out.append(dict(model=name, layers=len(obj.num_experts), experts=obj.num_experts[0],
                        top_k=obj.memory.layout.layers[0].top_k,
                        bytes_per_expert=obj.memory.layout.layers[0].bytes_per_expert,
                        dense_bytes=obj.memory.layout.dense_bytes, load_ns=obj.load_ns, target_ns=target,
                        miss_curves_seconds=curve_wall[0], budgets=rows))
    result = dict(runs=runs, settings=dataclasses.asdict(SearchSettings()), models=out)
    if frontier_build:
        built, walls, cpus = timed(lambda: frontier.build(b.mix, b.target_ns), 1)
        result["frontier"] = dict(points=len(built.points), wall_seconds=walls[0], cpu_seconds=cpus[0],
                                  strategies=[p.strategy.value for p in built.points])
        print(f"  bundled LM frontier: {len(built.points)} budgets in {walls[0]:.1f} s")
    result["load_average"] = dict(before=load_before, after=os.getloadavg(), cpus=os.cpu_count())
    return result


# --- part 3: closeness to the exhaustive optimum --------------------------------------------
def small_space(seed: int) -> tuple[Objectives, int, float]:
    """A random synthetic space of 4 layers x 8 experts, both strategies, 5 frequencies: the
    tests' random E_accuracy and E_latency, random expert sizes, skewed routing, a load time
    from 10 µs to 5 ms (so either strategy can win), a random budget and latency target."""
    rng = np.random.default_rng([seed, 7])
    experts = (8,) * 4
    layout = ModelLayout("synthetic", "small", tuple(LayerLayout(i, f"layers.{i}", 8, 2, int(s)) for i, s in
                                                     enumerate(rng.integers(MIB // 2, 2 * MIB, 4))), 8 * MIB)
    inputs = 2 * len(experts) + 1
    accuracy = AccuracyModel(MIX, experts, (0.0,) * inputs, (1.0,) * inputs,
                             (tuple(map(tuple, rng.normal(size=(inputs, 8)))), tuple(map(tuple, rng.normal(size=(8, 1))))),
                             (tuple(rng.normal(size=8)), (0.0,)), y_mean=4.0, y_scale=0.5)
    latency = LatencyModel(10e6, 10e6, (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), (0, 1e5, 2e5, 6e5, 1.5e6, 3e6), 1.0,
                           experts)
    histogram = tuple(tuple(rng.dirichlet(np.full(8, 0.5))) for _ in experts)
    obj = Objectives(MIX, MemoryModel(layout, Reserve(kv_cache_bytes=MIB)), accuracy, latency, 20.0, histogram,
                     float(10 ** rng.uniform(4, np.log10(5e6))))
    budget = int(rng.integers(obj.memory.min_budget_bytes, obj.memory.plan_bytes(experts) + 1))
    return obj, budget, float(rng.uniform(10.05e6, 11.5e6))


def optimum_synthetic(spaces: int) -> dict:
    rows = []
    for seed in tqdm(range(spaces), desc="small spaces: search vs exhaustive", unit="space"):
        obj, budget, target = small_space(seed)
        best, (ex_wall,), _ = timed(lambda: exhaustive(obj, budget, target), 1)
        found, (wall,), _ = timed(lambda: search(obj, budget, target, SearchSettings(enumerate_below=0)), 1)
        loss = lambda f: float(obj.loss(np.array([f.predicted.accuracy]))[0])  # noqa: E731
        gap = (loss(found) - loss(best)) / abs(loss(best))
        rows.append(dict(seed=seed, budget_bytes=budget, target_ns=target, load_ns=obj.load_ns,
                         optimum=best.to_json(), found=found.to_json(),
                         same_plan=plan_of(found) == plan_of(best),
                         hit=found.meets_latency == best.meets_latency and loss(found) <= loss(best) + 1e-12,
                         relative_gap=gap, search_seconds=wall, exhaustive_seconds=ex_wall))
    gaps = [r["relative_gap"] for r in rows]
    return dict(spaces=spaces, space_size=2 * 5 * 8 ** 4, rows=rows, hits=sum(r["hit"] for r in rows),
                same_plan=sum(r["same_plan"] for r in rows), mean_gap=float(np.mean(gaps)), max_gap=float(np.max(gaps)),
                median_search_seconds=statistics.median(r["search_seconds"] for r in rows),
                median_exhaustive_seconds=statistics.median(r["exhaustive_seconds"] for r in rows),
                strategies=sorted({r["optimum"]["strategy"] for r in rows}))


def plan_of(found: Found) -> tuple:
    return found.strategy, found.update_frequency, found.experts_per_layer


def optimum_bundled(b: Bundled, shares=SHARES) -> dict:
    """Per budget and E_accuracy: every masked-gating plan enumerated against the searched
    plan (the same objectives the truth test searched with). The planner's model at each update
    frequency that can meet the target; one network at its searched frequency only."""
    rows = []
    for share in shares:
        total = experts_at(share, b.capacity)
        budget = budget_for(b.memory, total)
        for role, single in b.searches().items():
            searched = search(b.masked(single=single), budget, b.target_ns)
            frequencies = (searched.update_frequency,) if single else b.mix.update_frequencies
            per_frequency = {}
            for f in frequencies:
                if not can_meet(b, f, budget):
                    per_frequency[f] = dict(skipped="no plan within the budget meets the latency target here")
                    continue
                best, (wall,), _ = timed(lambda: exhaustive(b.masked((f,), single), budget, b.target_ns), 1)
                per_frequency[f] = dict(optimum=best.to_json(), seconds=wall)
                print(f"  {share:.0%}, {role}, f={f}: optimum {best.experts_per_layer} {best.predicted.accuracy:.3f} "
                      f"({best.evaluated} evaluated, {wall:.1f} s)")
            enumerated = [v["optimum"] for v in per_frequency.values() if "optimum" in v]
            overall = min(enumerated, key=lambda o: (not o["meets_latency"], o["accuracy"], o["inter_token_ns"]))
            at_f = per_frequency[searched.update_frequency]["optimum"]
            rows.append(dict(share=share, experts=total, budget_bytes=budget, role=role, searched=searched.to_json(),
                             per_frequency={str(k): v for k, v in per_frequency.items()}, optimum_at_f=at_f,
                             optimum=overall, gap_at_f=(searched.predicted.accuracy - at_f["accuracy"]) / at_f["accuracy"],
                             gap=(searched.predicted.accuracy - overall["accuracy"]) / overall["accuracy"]))
    return dict(model=b.model_name, rows=rows)


def can_meet(b: Bundled, frequency: int, budget: int) -> bool:
    """Whether any masked-gating plan at ``frequency`` within ``budget`` can meet the target.
    E_latency grows with the share of layers that load (keep fewer than all their experts), so
    the fastest plan keeps as many layers whole as the budget allows, the rest at one expert."""
    layers = b.memory.layout.layers
    kept = [1] * len(layers)
    for i in sorted(range(len(layers)), key=lambda i: (layers[i].num_experts - 1) * layers[i].bytes_per_expert):
        whole = kept[:i] + [layers[i].num_experts] + kept[i + 1:]
        if b.memory.plan_bytes(whole) <= budget:
            kept = whole
    return bool(b.mix.masked_latency(np.array([frequency]), np.array([kept]))[0] <= b.target_ns)


# --- the report -----------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny judging set, fewer of everything; "
                                                             "writes nothing")
    parser.add_argument("--texts", type=int, default=6, help="judging texts per domain")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per judging text")
    parser.add_argument("--randoms", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the latency check")
    parser.add_argument("--runs", type=int, default=3, help="search runs per timing")
    parser.add_argument("--spaces", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--findings", type=Path, help="a Markdown file for the report's 'What this shows'")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.tokens, args.randoms, args.runs, args.spaces, args.rounds = 1, 64, 3, 1, 3, 1
    argv = sys.argv[1:] if argv is None else argv
    out = HERE / "RESULTS-planning" if not args.quick else Path(tempfile.mkdtemp()) / "RESULTS-planning"
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    command = " ".join(["python -m benchmarks.planning", *argv])
    results = dict(command=command, reruns=[],
                   machine=f"{platform.machine()}, {os.cpu_count()} CPUs, one torch thread for scoring")
    carried = [p for p in PARTS if p not in args.parts and p in previous]
    results["part_seconds"] = {p: previous["part_seconds"][p] for p in carried if p in previous.get("part_seconds", {})}
    if carried:  # a part (or none: the report only) run again on top of an earlier run
        results["command"], results["reruns"] = previous["command"], list(previous.get("reruns", []))
        if args.parts:
            results["reruns"].append(command)
    b = load_bundled()
    for part in PARTS:
        if part in carried:
            results[part] = previous[part]
            continue
        if part not in args.parts:
            continue
        print(f"== {part}", flush=True)
        start = time.perf_counter()
        if part == "truth":
            judging = ProfilingSet("lm", texts=args.texts, tokens=args.tokens, purpose="judging")
            results[part] = truth(b, judging, args.randoms, args.seed)
        elif part == "crosscheck":
            results[part] = crosscheck(b, results["truth"])
        elif part == "latency":
            results[part] = latency_check(b, args.rounds)
        elif part == "timing":
            results[part] = timing(b, args.runs, frontier_build=not args.quick)
        else:
            results[part] = dict(synthetic=optimum_synthetic(args.spaces),
                                 bundled=optimum_bundled(b, SHARES[:1] if args.quick else SHARES))
        results["part_seconds"][part] = time.perf_counter() - start
    if args.findings:
        results["findings"] = args.findings.read_text().strip()
    elif previous.get("findings"):
        results["findings"] = previous["findings"]
    write_report(results, out)
    if "truth" in results and not args.quick:
        plot_truth(results["truth"], HERE / "plots" / "planning-truth.png")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
