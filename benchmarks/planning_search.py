"""Parts 2 and 3 of ``benchmarks.planning``: the search's time on the bundled LM and on
Mixtral-8x7B- and DeepSeek-V3-shaped synthetic layouts, and its closeness to the exhaustive
optimum on small synthetic spaces and on the bundled LM's masked-gating plans."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.layout import LayerLayout, ModelLayout
from swapmoe.planner_service import frontier
from swapmoe.planner_service.objectives import Objectives, Service, inflection_latency_ns
from swapmoe.planner_service.search import Found, SearchSettings, exhaustive, search
from swapmoe.profiler.performance_models import AccuracyModel, LatencyModel
from swapmoe.profiler.workloads import MIX

from benchmarks.planning_bundled import SHARES, Bundled, budget_for, experts_at
from benchmarks.planning_report import GIB, MIB

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
            found, walls, cpus = timed(lambda: search(fresh, budget, Service(latency_target_ns=target), SearchSettings()), runs)
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
        built, walls, cpus = timed(lambda: frontier.build(b.mix, b.service), 1)
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
        best, (ex_wall,), _ = timed(lambda: exhaustive(obj, budget, Service(latency_target_ns=target)), 1)
        found, (wall,), _ = timed(lambda: search(obj, budget, Service(latency_target_ns=target), SearchSettings(enumerate_below=0)), 1)
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
            searched = search(b.masked(single=single), budget, b.service)
            frequencies = (searched.update_frequency,) if single else b.mix.update_frequencies
            per_frequency = {}
            for f in frequencies:
                if not can_meet(b, f, budget):
                    per_frequency[f] = dict(skipped="no plan within the budget meets the latency target here")
                    continue
                best, (wall,), _ = timed(lambda: exhaustive(b.masked((f,), single), budget, b.service), 1)
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
