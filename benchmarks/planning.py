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
from swapmoe.core.sizes import format_size
from swapmoe.planner_service import frontier, profiles
from swapmoe.planner_service.objectives import Objectives, inflection_latency_ns
from swapmoe.planner_service.search import Found, SearchSettings, exhaustive, search
from swapmoe.profiler.configs import Configuration, allocate
from swapmoe.profiler.models import AccuracyModel, LatencyModel
from swapmoe.profiler.report import load_device
from swapmoe.profiler.workloads import MIX, ProfilingSet

HERE = Path(__file__).resolve().parent
PROFILE = HERE / "profiles" / "e1a419fec4d32150"
ACCURACY_DIR = PROFILE / "accuracy" / "profiling-lm-3x256"
DEVICE_DIR = PROFILE / "devices" / "x86_64-bench"
SHARES = (0.25, 0.5, 0.75)  # of all experts: the budgets every part plans for
MIB, GIB = 1 << 20, 1 << 30
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


def predicted_mix(plan: dict, searched: str) -> float:
    """The mix prediction of the model that searched ``searched``."""
    return plan["predicted_one_network"] if searched.endswith("one network") else plan["predicted"][MIX]


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
def ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms"


def kept(plan: dict) -> str:
    return ",".join(map(str, plan["experts_per_layer"]))


def truth_section(t: dict) -> list[str]:
    j, roles = t["judging"], list(t["budgets"][0]["summary"])
    lines = ["## 1. The truth test: measured perplexity on held-out data", "",
             f"The bundled LM (6 MoE layers x 16 experts), its stored profiles (`{ACCURACY_DIR.relative_to(HERE.parent)}`, "
             f"`{DEVICE_DIR.relative_to(HERE.parent)}`; e_accuracy.json {t['provenance']['e_accuracy_sha256']}, code "
             f"{t['provenance']['git']}). Every plan is scored by the executor's own runtime "
             f"(`profiler.scoring.Scorer`: masked gating, importance, resident-set updates) on the **judging** set "
             f"`{t['judging_set']}` ({j['texts']} texts x {j['tokens']} tokens per domain, documents disjoint from the "
             f"profiling half E_accuracy was fitted on). `mix` weighs the three domains the same.", "",
             f"The searched plan: `search()` with the mix objectives restricted to masked gating and the planner's "
             f"default latency target, E_latency at the device's inflection point (update frequency {t['inflection']}: "
             f"{ms(t['target_ns'])}), with the planner's E_accuracy ({t['model']})"
             + ("; beside it the same search with the first of those networks alone (\"one network\", what the "
                "planner used before the ensemble)" if len(roles) > 1 else "") +
             f". The even split and {t['randoms']} random splits (Dirichlet shares, concentration "
             f"log-uniform in 0.1-30, as `profiler.configs.sample` draws them) keep the same number of experts at "
             f"the searched plan's update frequency. Full model on the judging set: "
             + ", ".join(f"{w} {v:.2f}" for w, v in t["full_model"].items()) + " (on the profiling set: "
             + ", ".join(f"{w} {v:.2f}" for w, v in t["profiling_reference"].items()) + ").", "",
             "| experts kept | budget | search | searched plan | measured mix: searched | even split | random best "
             "| random median | searched vs the best of even and random | rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in t["budgets"]:
        for role in roles:
            s, p = row["summary"][role], row["plans"][role]
            model = t["model"] if role == "searched" else "one network"
            lines.append(f"| {row['experts']} of 96 ({row['share']:.0%}) | {row['budget_bytes'] / MIB:.2f} MiB | "
                         f"{model} | `{kept(p)}` f={p['update_frequency']} | **{s['searched']:.2f}** | {s['even']:.2f} | "
                         f"{s['random_best']:.2f} | {s['random_median']:.2f} | "
                         f"{'better' if s['searched_is_best'] else 'worse'} by {abs(s['margin']):.1%} "
                         f"(than {s['best_other']}) | {s['rank']} of {s['plans_compared']} |")
    lines += ["", "Per plan, E_accuracy's prediction next to the measurement (perplexity; predictions are of the "
                  "profiling data, measurements of the judging data):", "",
              f"| experts kept | plan | experts per layer | f | mix predicted ({t['model']}) | by one network "
              "| mix measured | code | manual | prose (measured) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in t["budgets"]:
        plans = row["plans"]
        randoms = sorted((r for r in plans if r.startswith("random")), key=lambda r: plans[r]["measured"][MIX])
        shown = roles + ["even"] + ([randoms[0], randoms[len(randoms) // 2]] if randoms else [])
        for role in shown:
            p = plans[role]
            label = role if not role.startswith("random") else \
                ("random (best)" if role == randoms[0] else "random (a median one)")
            m, one = p["measured"], p.get("predicted_one_network")
            lines.append(f"| {row['experts']} | {label} | `{kept(p)}` | {p['update_frequency']} | "
                         f"{p['predicted'][MIX]:.2f} | {'' if one is None else f'{one:.2f}'} | {m[MIX]:.2f} | "
                         f"{m['code']:.2f} | {m['manual']:.2f} | {m['prose']:.2f} |")
    lines += ["", f"E_accuracy on the judging data, over the {t['budgets'][0]['summary']['searched']['plans_compared']} plans "
                  "of each budget (its searched plan, even, random): "
                  "mean relative error of the mix prediction; the same error of perplexity relative to the full model "
                  "(predicted / full model on the profiling set against measured / full model on the judging set: "
                  "the judging texts are easier, so raw errors are mostly that offset); that error on the plan the "
                  "model's own search picked (negative: the model thought it better than it is); rank correlation "
                  "between predicted and measured:", "",
              "| experts kept | E_accuracy | mean rel. error | relative to the full model | on its searched plan | "
              "rank corr. |", "|---|---|---|---|---|---|"]
    for row in t["budgets"]:
        for role in roles:
            compared = [r for r in row["plans"] if r == role or r == "even" or r.startswith("random")]
            errors = {r: relative_to_full_error(t, row["plans"][r], role) for r in compared}
            s = row["summary"][role]
            lines.append(f"| {row['experts']} | {t['model'] if role == 'searched' else 'one network'} | "
                         f"{s['prediction_mean_relative_error']:.1%} | {np.mean([abs(e) for e in errors.values()]):.1%} "
                         f"| {errors[role]:+.1%} | {s['prediction_spearman']:.3f} |")
    lines += ["", "What the full strategy-aware search (masked gating and on-demand, the planner's real behaviour, "
                  f"E_accuracy {t['model']}) picks at each budget:", "",
              "| experts kept | strategy | f | experts per layer | predicted mix | predicted latency | target | "
              "measured mix |", "|---|---|---|---|---|---|---|---|"]
    for row in t["budgets"]:
        a, p = row["strategy_aware"], row["plans"]["strategy-aware"]
        note = " (exact: the full model)" if p.get("exact") else ""
        lines.append(f"| {row['experts']} | {a['strategy']} | {a['update_frequency']} | `{kept(a)}` | "
                     f"{a['accuracy']:.2f} | {ms(a['inter_token_ns'])} | {ms(t['target_ns'])} | "
                     f"{p['measured'][MIX]:.2f}{note} |")
    lines += ["", f"Scoring took {t['scoring_seconds'] / 60:.1f} min for {t['configurations_scored']} distinct "
                  f"configurations (the full model among them). Plot: `benchmarks/plots/planning-truth.png`.", ""]
    return lines


def crosscheck_section(c: dict) -> list[str]:
    lines = ["### Cross-check on the profiling set", "",
             f"The searched plans, the even split and the best random split of each budget (best on the judging set) "
             f"scored again on `{c['profiling_set']}`, the set the stored accuracy profile was scored on and "
             f"E_accuracy fitted to ({c['profile_configurations']} configurations; † marks one of them). "
             f"Full model: mix {c['full_model'][MIX]:.2f}. The predictions here are of this very data.", "",
             "| experts kept | plan | experts per layer | E_accuracy (planner's) | one network | measured, profiling set "
             "| measured, judging set |", "|---|---|---|---|---|---|---|"]
    for p in c["plans"]:
        mark = " †" if p["in_accuracy_profile"] else ""
        one = p.get("predicted_one_network")
        lines.append(f"| {p['experts']} | {p['role']} | `{p['key'].split(';k=')[1]}`{mark} | {p['predicted']:.2f} | "
                     f"{'' if one is None else f'{one:.2f}'} | {p['profiling']:.2f} | {p['judging']:.2f} |")
    return lines + [""]


def latency_section(t: dict) -> list[str]:
    lines = ["### The predicted latency of the picks, measured", "",
             f"Inter-token time through a real `Engine` (the device profile's own way: greedy generation, "
             f"{t['tokens']} new tokens after a 32-token judging prompt of each domain, median over {t['rounds']} "
             f"rounds x {t['prompts']} prompts, plans interleaved round by round; one untimed generation after each "
             f"plan change). The device profile's no-update baseline, measured among them, ran at {1 / t['drift']:.3f}x "
             f"the speed E_latency assumes; the last error column scales the predictions by that drift. E_latency "
             f"charges an on-demand miss {t['load_ns'] / 1e3:.0f} µs (measured by the device profile under on-demand loading).", "",
             "| budget | plan | strategy, f | experts per layer | predicted | measured | error | error, drift-corrected "
             "| loads per token (predicted misses) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in t["plans"]:
        misses = f" ({p['predicted_misses_per_token']:.2f})" if p["predicted_misses_per_token"] is not None else ""
        lines.append(f"| {p['budget']} | {p['kind']} | {p['strategy']}, {p['update_frequency']} | "
                     f"`{kept(p)}` | {ms(p['predicted_ns'])} | {ms(p['measured_ns'])} | {p['error']:+.1%} | "
                     f"{p['error_drift_corrected']:+.1%} | {p['loads_per_token']:.2f}{misses} |")
    return lines + ["", f"The latency target: {ms(t['target_ns'])} (uncorrected).", ""]


def relative_to_full_error(t: dict, plan: dict, searched: str = "searched") -> float:
    """(predicted / full model on the profiling set) / (measured / full model on the judging set) - 1,
    by the model that searched ``searched``."""
    predicted = predicted_mix(plan, searched) / t["profiling_reference"][MIX]
    return predicted / (plan["measured"][MIX] / t["full_model"][MIX]) - 1


def timing_section(t: dict) -> list[str]:
    s = t["settings"]
    lines = ["## 2. Search time", "",
             f"`search()` with the default `SearchSettings()` (population {s['population']}, {s['generations']} "
             f"generations, seed {s['seed']}), median of {t['runs']} runs, wall time (process CPU time beside it: "
             f"other work on the machine lengthens the first, not the second). Latency target: E_latency at update "
             f"frequency 16 for every layout. The bundled LM uses its real profiles and both "
             f"strategies. The Mixtral- and DeepSeek-shaped layouts use **synthetic** performance models: E_accuracy a "
             f"network with random weights (as in `tests/test_planner_search.py`), E_latency the tests' overhead curve "
             f"scaled to the base time, a Zipf-like (1/rank) expert histogram per layer for on-demand misses, loads at "
             f"2 GiB/s. Load average (1 min) before/after: {t['load_average']['before'][0]:.2f} / "
             f"{t['load_average']['after'][0]:.2f} on {t['load_average']['cpus']} CPUs.", "",
             "| model | layers x experts, top-k | bytes per expert | miss curves (once) | 25% | 50% | 75% | "
             "picked (25/50/75%) |", "|---|---|---|---|---|---|---|---|"]
    for m in t["models"]:
        cells = [f"{r['median_seconds']:.2f} s (CPU {statistics.median(r['cpu_seconds']):.2f} s)" for r in m["budgets"]]
        picks = " / ".join(f"{r['found']['strategy'].replace('masked_gating', 'MG').replace('on_demand', 'OD')}"
                           f" f={r['found']['update_frequency']}" for r in m["budgets"])
        lines.append(f"| {m['model']} | {m['layers']} x {m['experts']}, top-{m['top_k']} | "
                     f"{format_size(m['bytes_per_expert'])} | {m['miss_curves_seconds'] * 1e3:.1f} ms | "
                     + " | ".join(cells) + f" | {picks} |")
    if "frontier" in t:
        f = t["frontier"]
        lines += ["", f"The bundled LM's frontier (`frontier.build`, {f['points']} budgets from one expert per layer to "
                      f"all, each search seeded with the one below): **{f['wall_seconds']:.1f} s** (CPU "
                      f"{f['cpu_seconds']:.1f} s); strategies picked: "
                      + ", ".join(f"{s}" for s in f["strategies"]) + "."]
    return lines + [""]


def optimum_section(o: dict) -> list[str]:
    a = o["synthetic"]
    lines = ["## 3. Closeness to the exhaustive optimum", "",
             f"### (a) {a['spaces']} random small synthetic spaces", "",
             f"4 MoE layers x 8 experts (random sizes 0.5-2 MiB), both strategies, 5 update frequencies: "
             f"{a['space_size']:,} configurations. E_accuracy a network with random weights, the tests' E_latency, "
             f"skewed routing, a load time log-uniform in 10 µs-5 ms, random budget and latency target. The genetic "
             f"search is forced (`SearchSettings(enumerate_below=0)`, defaults otherwise) and compared with "
             f"`exhaustive()`. Optima picked: {', '.join(a['strategies'])}.", "",
             "| spaces | search finds the optimum (loss) | same plan | mean gap in predicted loss | max gap | "
             "search (median) | exhaustive (median) |", "|---|---|---|---|---|---|---|",
             f"| {a['spaces']} | **{a['hits']} of {a['spaces']}** | {a['same_plan']} | {a['mean_gap']:.3%} | "
             f"{a['max_gap']:.3%} | {a['median_search_seconds']:.2f} s | {a['median_exhaustive_seconds']:.2f} s |", ""]
    misses = [r for r in a["rows"] if not r["hit"]]
    if misses:
        lines += ["Misses: " + "; ".join(f"space {r['seed']}: found `{kept(r['found'])}` {r['found']['strategy']} "
                                         f"f={r['found']['update_frequency']} ({r['found']['accuracy']:.3f}) against "
                                         f"`{kept(r['optimum'])}` {r['optimum']['strategy']} "
                                         f"f={r['optimum']['update_frequency']} ({r['optimum']['accuracy']:.3f})"
                                         for r in misses) + ".", ""]
    model = o["bundled"].get("model", "one network")
    lines += ["### (b) The bundled LM, masked gating, every plan enumerated", "",
              "Per budget, every masked-gating plan (16^6 = 16.8 M experts-per-layer vectors, those within the budget "
              f"evaluated): with the planner's E_accuracy ({model}) at each update frequency for which a plan within "
              "the budget can meet the latency target (at the others even the fastest updating plan, the most layers "
              "kept whole, is too slow: skipped); with one network at its searched plan's frequency only.", "",
              "| experts kept | E_accuracy | searched plan | predicted mix | optimum at its frequency | predicted | gap | "
              "best over the frequencies enumerated | enumeration time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in o["bundled"]["rows"]:
        s, at, best = r["searched"], r["optimum_at_f"], r["optimum"]
        seconds = sum(v.get("seconds", 0) for v in r["per_frequency"].values())
        freqs = [k for k, v in r["per_frequency"].items() if "optimum" in v]
        name = model if r.get("role", "searched") == "searched" else "one network"
        lines.append(f"| {r['experts']} | {name} | `{kept(s)}` f={s['update_frequency']} | {s['accuracy']:.3f} | "
                     f"`{kept(at)}` | {at['accuracy']:.3f} | {r['gap_at_f']:.2%} | `{kept(best)}` "
                     f"f={best['update_frequency']}: {best['accuracy']:.3f} | {seconds:.0f} s (f in {', '.join(freqs)}) |")
    return lines + [""]


def write_report(results: dict, out: Path) -> None:
    lines = ["# Planner benchmark: the genetic search", "",
             f"Reproduce: `{results['command']}` ({results['machine']}). Part times: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["part_seconds"].items()) + "."
             + (" Then rerun alone: " + ", ".join(f"`{c}`" for c in results["reruns"]) + "." if results["reruns"] else ""),
             ""]
    if "truth" in results:
        lines += truth_section(results["truth"])
    if "crosscheck" in results:
        lines += crosscheck_section(results["crosscheck"])
    if "latency" in results:
        lines += latency_section(results["latency"])
    if "timing" in results:
        lines += timing_section(results["timing"])
    if "optimum" in results:
        lines += optimum_section(results["optimum"])
    if results.get("findings"):
        lines += ["## What this shows", "", results["findings"], ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def plot_truth(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, row in enumerate(t["budgets"]):
        plans = row["plans"]
        randoms = [p["measured"][MIX] for r, p in plans.items() if r.startswith("random")]
        ax.scatter(np.full(len(randoms), i) + np.linspace(-0.15, 0.15, len(randoms)), randoms, s=12, c="0.6",
                   label="random splits" if i == 0 else None)
        ax.scatter([i], [plans["even"]["measured"][MIX]], marker="s", c="tab:orange", label="even split" if i == 0 else None)
        ax.scatter([i], [plans["searched"]["measured"][MIX]], marker="*", s=140, c="tab:blue",
                   label=f"searched plan ({t.get('model', 'one network')})" if i == 0 else None)
        if "searched, one network" in plans:
            ax.scatter([i + 0.05], [plans["searched, one network"]["measured"][MIX]], marker="^", s=50, c="tab:green",
                       label="searched plan (one network)" if i == 0 else None)
    ax.axhline(t["full_model"][MIX], color="k", lw=0.8, ls="--", label="full model")
    ax.set_xticks(range(len(t["budgets"])), [f"{r['experts']} of 96 experts" for r in t["budgets"]])
    ax.set_yscale("log")
    ax.set_ylabel(f"mix perplexity, judging set ({t['judging_set']})")
    ax.set_title("Bundled LM: measured perplexity per plan (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
