"""The truth test with rows: plans that choose batch rows with experts, measured.

    python -m benchmarks.planning_rows            # ~20 min on 2 cores; writes benchmarks/results/RESULTS-planning-rows.{md,json}
    python -m benchmarks.planning_rows --quick    # a smoke run: prints, writes nothing

The bundled LM on this machine through a real ``Engine`` (``--max-batch 8``): its device is
profiled first (decode at 1, 2, 4 and 8 rows among the rest), and the planner's objectives are
built from that profile, the bundled accuracy profile and the engine's own memory model. At three
budgets (between the one-sequence minimum and the smallest full-batch plan, and at half and three
quarters of the experts beside a full batch) and two offered loads (1 and 8 concurrent streams),
three kinds of plan of the same bytes:

- *searched*: ``search()`` for that budget and load, at the planner's default latency target
  (the device's inflection point, as it grows when every offered stream runs at once);
- *even*: the executor's even split with its default batch (rows 0: as many as the budget holds);
- *random*: 20 (rows, experts) plans spending the same bytes (rows uniform in 1-8, experts split
  by a random Dirichlet share), the same 20 at both loads.

Each is measured twice: perplexity on the judging half of the bundled data (which the profiles
never saw) by the executor's own runtime (``Scorer``), and, through the engine, the time between
tokens each of the load's concurrent streams sees and the tokens per second over all of them.
"Best random" is the most accurate random plan at least as fast per stream as the searched one.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from swapmoe.core.plan import Plan
from swapmoe.planner_service import profiles
from swapmoe.planner_service.objectives import Objectives, Service, inflection_latency_ns
from swapmoe.planner_service.search import search
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.workloads import MIX, ProfilingSet, rows

from benchmarks.planning import score_all
from benchmarks.planning_bundled import MG, random_allocations
from benchmarks.planning_report import ACCURACY_DIR, run_and_report
from benchmarks.planning_report import parser as planning_parser

LOADS = (1, 8)
MAX_BATCH = 8


def profiled_objectives(engine) -> tuple[Objectives, float, dict]:
    """The mix objectives of the bundled LM on this device, measured now, and the one-stream
    latency at the device's inflection point."""
    from swapmoe.executor.device_profiling import ProfileSpec

    device = None
    for progress in tqdm(engine.profile(ProfileSpec()), desc="device profile", unit="step"):
        device = progress.result or device
    accuracy = profiles.load_accuracy(ACCURACY_DIR)
    objectives = profiles.objectives(accuracy, device, engine.memory_model)[MIX]
    inflection = inflection_latency_ns(objectives.latency, device.inflection_update_frequency)
    facts = dict(decode_step_ns=device.decode_step_ns, inflection_update_frequency=device.inflection_update_frequency,
                 batch_decode=[(p.rows, p.step_ns) for p in device.batch_decode])
    return objectives, inflection, facts


def budgets(obj: Objectives) -> dict[str, int]:
    memory, layout = obj.memory, obj.memory.layout
    capacity = [l.num_experts for l in layout.layers]
    gap = (memory.min_budget_bytes + memory.smallest_plan_bytes) // 2

    def experts(share: float) -> int:
        return memory.plan_bytes([max(1, round(share * c)) for c in capacity])
    return {"between the minimum and a full batch": gap, "half the experts, full batch": experts(0.5),
            "3/4 of the experts, full batch": experts(0.75)}


def random_plans(obj: Objectives, budget: int, count: int, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """(rows, experts) plans spending ``budget``: rows uniform in what fits, experts a random split."""
    memory, rng = obj.memory, np.random.default_rng([seed, budget])
    capacity = obj.num_experts
    expert = memory.layout.layers[0].bytes_per_expert  # the bundled LM's experts are all one size
    out = []
    for i in range(count):
        most = memory.rows_within([1] * len(capacity), budget)
        r = int(rng.integers(1, most + 1))
        total = min(sum(capacity), (budget - memory.plan_bytes([0] * len(capacity), r)) // expert)
        out.append((r, random_allocations(int(total), capacity, 1, seed * 1000 + i)[0]))
    return out


def serve(engine, plan: Plan, budget: int, load: int, prompts: list, tokens: int, rounds: int) -> dict:
    """``load`` streams at once: each stream's time per token from its request to its last token
    (waiting for a row included: what E_latency predicts at the load), its time between streamed
    tokens, and tokens/s over all streams."""
    from swapmoe.executor.requests import GenerationRequest

    result = engine.apply_plan(replace(plan, version=engine.plan.version + 1, budget_bytes=budget))
    assert result.accepted, result.reason
    list(engine.generate(GenerationRequest(prompts[0], max_new_tokens=8)))  # the new plan's loads settle
    per_stream, streamed, throughput = [], [], []
    for _ in range(rounds):
        stamps: list[list[int]] = [[] for _ in range(load)]

        def run(i: int) -> None:
            request = GenerationRequest(prompts[i % len(prompts)], max_new_tokens=tokens)
            stamps[i] = [time.perf_counter_ns() for chunk in engine.generate(request) for _ in chunk.token_ids]
        start = time.perf_counter_ns()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(load)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter_ns() - start
        per_stream.append(statistics.mean((s[-1] - start) / len(s) for s in stamps))
        streamed.append(statistics.mean((s[-1] - s[0]) / (len(s) - 1) for s in stamps))
        throughput.append(sum(len(s) for s in stamps) * 1e9 / wall)
    return dict(inter_token_ns=statistics.median(per_stream), streamed_ns=statistics.median(streamed),
                throughput=statistics.median(throughput), rows=result.achieved_rows)


def run(args) -> dict:
    from transformers.utils import logging as hf_logging

    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.models.bundled import LM_DIR

    hf_logging.set_verbosity_error()
    judging = ProfilingSet("lm", texts=args.texts, tokens=args.tokens, purpose="judging")
    with Engine(EngineConfig(LM_DIR, 256 << 20, node_id="bench-rows", max_batch=MAX_BATCH)) as engine:
        obj, inflection, device = profiled_objectives(engine)
        prompts = [engine.tokenize(r["text"])[:32] for d in ("code", "prose", "manual")
                   for r in rows(d, "judging")[:3]]
        cells = []
        for name, budget in budgets(obj).items():
            randoms = random_plans(obj, budget, args.randoms, args.seed)
            for load in LOADS:
                target = obj.latency_target_ns(Service(load), inflection)
                found = search(obj, budget, Service(load, target))
                f = found.update_frequency
                plans = {"searched": found.plan(0, "searched"),
                         "even": Plan(0, obj.memory.fit(budget), f, MG, "even")}
                plans.update({f"random {i}": Plan(0, k, f, MG, f"random {i}", rows=r)
                              for i, (r, k) in enumerate(randoms)})
                cells.append(dict(budget_name=name, budget_bytes=budget, load=load, target_ns=target,
                                  predicted=found.to_json(), plans=plans))
        configs = [Configuration(p.experts_per_layer, p.update_frequency) for c in cells for p in c["plans"].values()]
        scores = score_all(configs, judging)
        for cell in tqdm(cells, desc="serving at each load", unit="cell"):
            measured = {}
            for role, plan in cell["plans"].items():
                served = serve(engine, plan, cell["budget_bytes"], cell["load"], prompts, args.serve_tokens,
                               args.rounds)
                key = Configuration(plan.experts_per_layer, plan.update_frequency).key
                predicted = obj.predict_one(MG, plan.update_frequency, plan.experts_per_layer,
                                            plan.rows or served["rows"], cell["load"])
                measured[role] = dict(rows=served["rows"], plan_rows=plan.rows, experts_per_layer=list(plan.experts_per_layer),
                                      update_frequency=plan.update_frequency, perplexity=scores[key]["accuracy"][MIX],
                                      inter_token_ns=served["inter_token_ns"], streamed_ns=served["streamed_ns"],
                                      throughput=served["throughput"],
                                      predicted_perplexity=predicted.accuracy,
                                      predicted_inter_token_ns=predicted.inter_token_ns,
                                      predicted_throughput=predicted.throughput,
                                      memory_bytes=obj.memory.plan_bytes(plan.experts_per_layer,
                                                                         plan.rows or served["rows"]))
            cell["plans"] = measured
            cell["summary"] = summarise(measured)
    return dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs", device=device, inflection_ns=inflection,
                judging=dict(texts=args.texts, tokens=args.tokens), randoms=args.randoms, seed=args.seed,
                serve_tokens=args.serve_tokens, rounds=args.rounds, cells=cells)


def summarise(plans: dict[str, dict]) -> dict:
    searched, even = plans["searched"], plans["even"]
    randoms = {r: p for r, p in plans.items() if r.startswith("random")}
    as_fast = {r: p for r, p in randoms.items() if p["inter_token_ns"] <= searched["inter_token_ns"] * 1.05}
    best = min(as_fast, key=lambda r: as_fast[r]["perplexity"]) if as_fast else None
    most_accurate = min(randoms, key=lambda r: randoms[r]["perplexity"])
    return dict(
        vs_even=_compare(searched, even), best_random=best, vs_best_random=_compare(searched, plans[best]) if best else
        "no random plan as fast", random_as_fast=len(as_fast), most_accurate_random=most_accurate,
        random_more_accurate_and_as_fast=sum(p["perplexity"] < searched["perplexity"] for p in as_fast.values()))


def _compare(a: dict, b: dict) -> str:
    """How plan ``a`` stands against ``b``: perplexity and per-stream speed, 2% counted a tie."""
    accurate = (b["perplexity"] - a["perplexity"]) / b["perplexity"]
    fast = (b["inter_token_ns"] - a["inter_token_ns"]) / b["inter_token_ns"]
    words = []
    for gain, good, bad in ((accurate, "more accurate", "less accurate"), (fast, "faster", "slower")):
        words.append(f"{abs(gain):.0%} {good if gain > 0 else bad}" if abs(gain) >= 0.02 else f"tie ({gain:+.1%})")
    return ", ".join(words)


def report(results: dict, command: str) -> list[str]:
    lines = ["# Planning with rows: the truth test at two offered loads", "",
             f"Reproduce: `{command}` ({results['machine']}; {results['minutes']:.1f} min). The bundled LM through a "
             f"real `Engine` (--max-batch {MAX_BATCH}), its device profiled first: decode pass at "
             + ", ".join(f"{r} rows {ns / 1e6:.1f} ms" for r, ns in results['device']['batch_decode'])
             + f"; inflection at update frequency {results['device']['inflection_update_frequency']}. Perplexity on "
             f"the judging half ({results['judging']['texts']} texts x {results['judging']['tokens']} tokens per "
             f"domain); serving: each stream {results['serve_tokens']} tokens, median of {results['rounds']} rounds.",
             "", "| budget | load | plan | rows | experts | perplexity (predicted) | ms per token per stream, waits "
             "included (predicted; target) | ms between streamed tokens | tokens/s all streams (predicted) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in results["cells"]:
        roles = ["searched", "even", cell["summary"]["best_random"], cell["summary"]["most_accurate_random"]]
        for role in dict.fromkeys(r for r in roles if r):
            p = cell["plans"][role]
            label = role + (" (best as fast)" if role == cell["summary"]["best_random"] else "") + \
                (" (most accurate)" if role == cell["summary"]["most_accurate_random"] else "")
            lines.append(f"| {cell['budget_bytes'] / 2**20:.1f} MiB ({cell['budget_name']}) | {cell['load']} | {label} | "
                         f"{p['rows']}{'' if p['plan_rows'] else ' (0: all that fit)'} | {sum(p['experts_per_layer'])} | "
                         f"{p['perplexity']:.2f} ({p['predicted_perplexity']:.2f}) | {p['inter_token_ns'] / 1e6:.1f} "
                         f"({p['predicted_inter_token_ns'] / 1e6:.1f}; {cell['target_ns'] / 1e6:.1f}) | "
                         f"{p['streamed_ns'] / 1e6:.1f} | "
                         f"{p['throughput']:.0f} ({p['predicted_throughput']:.0f}) |")
    lines += ["", "## Searched against the others", "", "| budget | load | searched vs even | searched vs best random "
              "as fast | random plans as fast (of them more accurate) |", "|---|---|---|---|---|"]
    for cell in results["cells"]:
        s = cell["summary"]
        lines.append(f"| {cell['budget_bytes'] / 2**20:.1f} MiB | {cell['load']} | {s['vs_even']} | {s['vs_best_random']} "
                     f"| {s['random_as_fast']} ({s['random_more_accurate_and_as_fast']}) |")
    return lines


def main(argv=None) -> None:
    parser = planning_parser(__doc__, texts=3)
    parser.add_argument("--randoms", type=int, default=20)
    parser.add_argument("--serve-tokens", type=int, default=128, help="tokens each stream generates")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.tokens, args.randoms, args.serve_tokens, args.rounds = 1, 64, 2, 8, 1
    run_and_report("planning-rows", args, run, report)


if __name__ == "__main__":
    main()
