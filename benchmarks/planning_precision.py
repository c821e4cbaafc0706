"""Precision as a plan dimension (issue 30), measured on the bundled LM.

    python -m benchmarks.planning_precision           # ~5 min on 2 cores; writes benchmarks/results/RESULTS-planning-precision.{md,json}
    python -m benchmarks.planning_precision --quick   # a smoke run: prints, writes nothing

1. ``model``: E_accuracy of the shipped profile (scored with experts at bfloat16, int8 and int4,
   ``swapmoe.profiler.configs``): its held-out error, overall and on the held-out configurations
   with some layer below float32, and what it predicts each precision costs.
2. ``plans``: the planner's search (``search()`` with the planner's objectives for the mix: both
   strategies, the default latency target at the device's inflection point) for the layout the
   executor registers (float32 experts and the lower precisions its store keeps) and, beside it,
   for the float32 experts alone (the planner before precision), at 50% of the float32 model's
   bytes and at the planning benchmark's budgets (dense weights plus 25/50/75% of the experts'
   float32 bytes). Every plan, the full model, each precision at full residency and the runtime
   benchmark's "virtual 50%" (8 experts per layer, an update every 4 tokens) are scored by the
   executor's own runtime (``profiler.scoring.Scorer``) on the judging set, which no model saw.
3. ``device``: a decode pass at each precision through a real ``Engine`` (its device profile's
   precision points) and the E_latency fitted on it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from types import SimpleNamespace

from swapmoe.core.budget import MemoryModel, Reserve
from swapmoe.core.plan import Strategy
from swapmoe.models.bundled import LM_DIR
from swapmoe.planner_service import profiles
from swapmoe.planner_service.objectives import Objectives, Service, inflection_latency_ns
from swapmoe.planner_service.search import Found, search
from swapmoe.planner_service.verification import configuration
from swapmoe.profiler import artifacts
from swapmoe.profiler.configs import Configuration
from swapmoe.profiler.report import load_device
from swapmoe.profiler.workloads import MIX, ProfilingSet

from benchmarks.planning import score_all
from benchmarks.planning_bundled import budget_for, experts_at
from benchmarks.planning_report import ACCURACY_DIR, DEVICE_DIR, MIB, run_and_report
from benchmarks.planning_report import parser as planning_parser

SHARES = (0.25, 0.5, 0.75)  # of the experts' float32 bytes beside the dense weights (benchmarks.planning)
GOAL = 0.05  # the searched plan's perplexity at 50% of the bytes within 5% of the full model's
RUNTIME_50 = Configuration((8,) * 6, 4)  # benchmarks.runtime's "virtual 50%"


def executor_layout(device_layout):
    """The device profile's layout with the precisions the executor's store keeps (what it registers)."""
    import torch

    from swapmoe.executor.adapters import with_precisions
    from swapmoe.executor.store import Manifest
    from swapmoe.executor.store_build import ensure_store

    manifest = Manifest.load(ensure_store(LM_DIR, log=lambda *_: None))
    return with_precisions(device_layout, SimpleNamespace(manifest=manifest), torch.device("cpu"))


def load() -> dict[str, Objectives]:
    """The planner's mix objectives with precision and with the float32 experts alone."""
    accuracy = profiles.load_accuracy(ACCURACY_DIR)
    device = load_device(DEVICE_DIR, accuracy.fingerprint)
    out = {}
    for name, layout in (("with precision", executor_layout(device.layout)), ("float32 only", device.layout)):
        out[name] = profiles.objectives(accuracy, device, MemoryModel(layout, Reserve()))[MIX]
    return out


def model_part(obj: Objectives) -> dict:
    """E_accuracy's held-out errors and the cost it predicts for each precision."""
    body = artifacts.read_json(ACCURACY_DIR / "e_accuracy.json", "e-accuracy")
    fit = body["workloads"][MIX]
    full, half = obj.num_experts, (8,) * len(obj.num_experts)
    predicted = {}
    for name, kept, frequency in (("full", full, 0), ("8 per layer, f=8", half, 8)):
        native = obj.accuracy.predict([Configuration(kept, frequency)])[0]
        predicted[name] = {p or "float32": float(obj.accuracy.predict([Configuration(kept, frequency, (p,) * 6)])[0]
                                                 / native - 1) for p in obj.precisions}
    rows = artifacts.read_scores(ACCURACY_DIR / artifacts.SCORES)
    return dict(configurations=len(rows), with_precision=sum(bool(r.get("precision")) for r in rows),
                precisions=list(obj.precisions[1:]), trained_on=fit["trained_on"], held_out=fit["held_out"],
                held_out_error={k: v["mean_relative_error"] for k, v in fit["held_out_error"].items()},
                held_out_with_precision=fit.get("held_out_with_precision", 0),
                held_out_error_with_precision={k: v["mean_relative_error"]
                                               for k, v in fit.get("held_out_error_with_precision", {}).items()},
                spearman_with_precision=fit.get("held_out_error_with_precision", {}).get("ensemble", {}).get("spearman"),
                predicted_cost=predicted)


def budgets(obj: Objectives) -> list[tuple[str, int]]:
    native = MemoryModel(dataclasses.replace(obj.memory.layout, layers=tuple(
        dataclasses.replace(l, precisions=()) for l in obj.memory.layout.layers)), Reserve())
    out = [("50% of the float32 model's bytes", obj.memory.layout.total_bytes // 2)]
    return out + [(f"dense + {s:.0%} of the experts", budget_for(native, experts_at(s, obj.num_experts)))
                  for s in SHARES]


def plans_part(objectives: dict[str, Objectives], judging: ProfilingSet) -> dict:
    obj = objectives["with precision"]
    accuracy = profiles.load_accuracy(ACCURACY_DIR)
    device = load_device(DEVICE_DIR, accuracy.fingerprint)
    target = inflection_latency_ns(obj.latency, device.inflection_update_frequency)
    service = Service(latency_target_ns=target)
    rows, configs = [], []
    for label, budget in budgets(obj):
        row = dict(budget=label, budget_bytes=budget, plans={})
        for search_name, o in objectives.items():
            start = time.perf_counter()
            found = search(o, budget, service)
            row["plans"][search_name] = dict(found=found.to_json(), seconds=round(time.perf_counter() - start, 2),
                                             key=configuration(found, o.num_experts).key,
                                             fits=obj.memory.over_budget(found.experts_per_layer, budget,
                                                                          found.precision) == "")
            configs.append(configuration(found, o.num_experts))
        rows.append(row)
    full = Configuration(obj.num_experts, 0)
    extra = [full, RUNTIME_50] + [Configuration(obj.num_experts, 0, (p,) * 6) for p in obj.precisions[1:]] + \
        [Configuration((8,) * 6, 8, (p,) * 6) for p in obj.precisions]
    scores = score_all(extra + configs, judging)
    reference = scores[full.key]["accuracy"][MIX]
    for row in rows:
        for plan in row["plans"].values():
            plan["measured"] = scores[plan["key"]]["accuracy"]
            plan["vs_full"] = plan["measured"][MIX] / reference - 1
    return dict(judging_set=judging.name, target_ns=target, inflection=device.inflection_update_frequency,
                full_model=scores[full.key]["accuracy"], rows=rows,
                precision_at={c.key: scores[c.key]["accuracy"][MIX] for c in extra},
                scoring_seconds=round(sum(s["seconds"] for s in scores.values()), 1))


def device_part(obj: Objectives, quick: bool) -> dict:
    """Precision points through a real Engine's device profile, and E_latency fitted on it."""
    from swapmoe.executor.device_profiling import ProfileSpec
    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.profiler.performance_models import fit_latency

    spec = ProfileSpec(token_counts=(1,), repeats=2 if quick else 5, update_frequencies=(0, 8), sweep_tokens=16)
    with Engine(EngineConfig(LM_DIR, 96 << 20, node_id="bench")) as engine:
        profile = None
        for progress in engine.profile(spec):
            profile = progress.result or profile
    latency = fit_latency(profile)
    timed = dataclasses.replace(obj, latency=latency)
    plans = {name: timed.predict_one(Strategy.MASKED_GATING, 8, kept, precision=(p,) * 6).inter_token_ns
             for name, kept, p in (("full, float32", obj.num_experts, ""), ("full, int4", obj.num_experts, "int4"),
                                   ("8 per layer, float32, f=8", (8,) * 6, ""), ("8 per layer, int4, f=8", (8,) * 6,
                                                                                  "int4"))}
    return dict(points={p.precision or profile.layout.dtype: p.step_ns for p in profile.precision_points},
                ratio=dict(zip(latency.precision_names, latency.precision_ratio)),
                bytes=dict(zip(latency.precision_names, latency.precision_bytes)), predicted_inter_token_ns=plans)


def run(args) -> dict:
    objectives = load()
    judging = ProfilingSet("lm", texts=args.texts, tokens=args.tokens, purpose="judging")
    out = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, one torch thread for scoring", seconds={})
    for part, work in (("model", lambda: model_part(objectives["with precision"])),
                       ("plans", lambda: plans_part(objectives, judging)),
                       ("device", lambda: device_part(objectives["with precision"], args.quick))):
        start = time.perf_counter()
        out[part] = work()
        out["seconds"][part] = round(time.perf_counter() - start, 1)
    return out


def _precision(found: dict) -> str:
    names = found.get("precision") or ["float32"] * len(found["experts_per_layer"])
    return ",".join(dict.fromkeys(names)) if len(set(names)) == 1 else ",".join(p or "float32" for p in names)


def report(results: dict, command: str) -> list[str]:
    m, p, d = results["model"], results["plans"], results["device"]
    headline = p["rows"][0]["plans"]
    searched, before = headline["with precision"], headline["float32 only"]
    lines = ["# Planner benchmark: precision as a plan dimension", "",
             f"Reproduce: `{command}` ({results['machine']}; {results.get('minutes', 0):.1f} min). The bundled LM "
             f"(6 MoE layers x 16 experts, float32) with its shipped profiles (`{ACCURACY_DIR.relative_to(ACCURACY_DIR.parents[4])}`, "
             f"`{DEVICE_DIR.relative_to(DEVICE_DIR.parents[4])}`).", "",
             "## The goal", "",
             f"At 50% of the float32 model's bytes ({p['rows'][0]['budget_bytes'] / MIB:.2f} MiB), the planner's searched "
             f"plan measures **{searched['measured'][MIX]:.2f}** mix perplexity on the judging set against the full "
             f"model's **{p['full_model'][MIX]:.2f}**: {searched['vs_full']:+.1%} (goal: within {GOAL:.0%}; "
             f"{'met' if abs(searched['vs_full']) <= GOAL else 'not met'}). The same search without precision (float32 "
             f"experts only, the planner before) measures {before['measured'][MIX]:.2f} ({before['vs_full']:+.1%}); the "
             f"runtime benchmark's \"virtual 50%\" (8 experts per layer, f=4) measures "
             f"{p['precision_at'][RUNTIME_50.key]:.2f} here.", "",
             "## 1. E_accuracy with precision", "",
             f"{m['configurations']} configurations scored, {m['with_precision']} of them with some layer at "
             f"{', '.join(m['precisions'])} (drawn as `profiler.configs` says: all float32, all at one lower precision, or "
             f"mixed per layer). Features: per layer the share of experts kept and its log, updates per token, and per "
             f"layer one indicator for each lower precision. Fitted on {m['trained_on']}, judged on {m['held_out']} held "
             f"out ({m['held_out_with_precision']} of those with precision):", "",
             "| model | held-out mean rel. error | on held-out configurations with precision |", "|---|---|---|"]
    for name, error in m["held_out_error"].items():
        lines.append(f"| {name} | {error:.2%} | {m['held_out_error_with_precision'].get(name, float('nan')):.2%} |")
    lines += ["", f"Rank correlation on the held-out configurations with precision (ensemble): "
                  f"{m['spearman_with_precision']:.3f}. What E_accuracy (ensemble) predicts each precision costs, "
                  "all layers at it, against the same experts at float32 (profiling data):", "",
              "| residency | " + " | ".join(m["predicted_cost"]["full"]) + " |",
              "|---|" + "---|" * len(m["predicted_cost"]["full"])]
    for name, costs in m["predicted_cost"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:+.2%}" for v in costs.values()) + " |")
    lines += ["", "Measured on the judging set (mix perplexity, and against the same experts at float32):", "",
              "| residency | " + " | ".join(m["predicted_cost"]["full"]) + " |",
              "|---|" + "---|" * len(m["predicted_cost"]["full"])]
    for name, kept, f in (("full", (16,) * 6, 0), ("8 per layer, f=8", (8,) * 6, 8)):
        at = [p["precision_at"][Configuration(kept, f, (q,) * 6).key] for q in ("", *m["precisions"])]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f} ({v / at[0] - 1:+.2%})" for v in at) + " |")
    lines += ["", "## 2. Searched plans, measured on text no model saw", "",
              f"`search()` with the planner's mix objectives, latency target {p['target_ns'] / 1e6:.2f} ms (E_latency at "
              f"the inflection point, update frequency {p['inflection']}), memory by `MemoryModel.plan_bytes` with "
              f"the plan's precision; scored on `{p['judging_set']}`. Full model: "
              + ", ".join(f"{w} {v:.2f}" for w, v in p["full_model"].items()) + ".", "",
              "| budget | MiB | search | strategy | experts per layer | precision | f | predicted mix | measured mix "
              "| vs full | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in p["rows"]:
        for name, plan in row["plans"].items():
            f = Found.from_json(plan["found"])
            lines.append(f"| {row['budget']} | {row['budget_bytes'] / MIB:.2f} | {name} | {f.strategy.value} | "
                         f"`{','.join(map(str, f.experts_per_layer))}` | {_precision(plan['found'])} | "
                         f"{f.update_frequency} | {f.predicted.accuracy:.2f} | **{plan['measured'][MIX]:.2f}** | "
                         f"{plan['vs_full']:+.1%} | {plan['fits']} |")
    lines += ["", "## 3. A decode pass at each precision (this machine, through a real Engine)", "",
              "Precision points of a fresh device profile: " + ", ".join(
                  f"{k} {v / 1e6:.2f} ms" for k, v in d["points"].items()) + "; E_latency's pass ratios "
              + ", ".join(f"{k} {v:.2f}" for k, v in d["ratio"].items()) + " and load-bytes ratios "
              + ", ".join(f"{k} {v:.2f}" for k, v in d["bytes"].items()) + ". Predicted inter-token times: "
              + ", ".join(f"{k} {v / 1e6:.2f} ms" for k, v in d["predicted_inter_token_ns"].items()) + ".", "",
              "Part times: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()) + "."]
    return lines


def main(argv=None) -> None:
    parser = planning_parser(__doc__, texts=6)
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.tokens = 1, 64
    run_and_report("planning-precision", args, run, report)


if __name__ == "__main__":
    main()
