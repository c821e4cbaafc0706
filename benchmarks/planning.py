"""The planner's genetic search (paper section 3.4.2): measured truth, search time, optimality.

    python -m benchmarks.planning                      # all parts (~20 min on 2 cores); writes
                                                       # benchmarks/results/RESULTS-planning.{md,json}, plots/planning-truth.png
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
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from swapmoe.core.plan import Strategy
from swapmoe.planner_service.search import Found, search
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.workloads import MIX, ProfilingSet

from benchmarks.planning_bundled import (MG, SHARES, Bundled, budget_for, even, experts_at, load_bundled,
                                        random_allocations)
from benchmarks.planning_report import ACCURACY_DIR, HERE, plot_truth, predicted_mix, write_report
from benchmarks.planning_search import optimum_bundled, optimum_synthetic, timing

PARTS = ("truth", "crosscheck", "latency", "timing", "optimum")
PROFILING_SET = ProfilingSet("lm", texts=3, tokens=256)  # what the stored accuracy profile was scored on


# --- part 1: the truth test -----------------------------------------------------------------
def truth(b: Bundled, judging: ProfilingSet, randoms: int, seed: int) -> dict:
    """Every plan of every budget scored with the real runtime on the judging set."""
    budgets = []
    for share in SHARES:
        total = experts_at(share, b.capacity)
        budget = budget_for(b.memory, total)
        found = {role: search(b.masked(single=single), budget, b.service) for role, single in b.searches().items()}
        chosen = search(b.mix, budget, b.service)
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
        plans.append((f"{share:.0%}", "masked gating", search(b.masked(), budget, b.service)))
        plans.append((f"{share:.0%}", "strategy-aware", search(b.mix, budget, b.service)))
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
    from swapmoe.executor.requests import GenerationRequest

    request = GenerationRequest(prompt, max_new_tokens=tokens)
    stamps = [time.perf_counter_ns() for chunk in engine.generate(request) for _ in chunk.token_ids]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


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
    out = HERE / "results" / "RESULTS-planning" if not args.quick else Path(tempfile.mkdtemp()) / "RESULTS-planning"
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
        plot_truth(results["truth"], HERE / "results" / "plots" / "planning-truth.png")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
