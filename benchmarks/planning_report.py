"""The planning benchmark's report: Markdown sections and the truth-test plot, from the results
``benchmarks.planning`` measured (plain dicts, as stored in RESULTS-planning.json)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from swapmoe.core.sizes import format_size
from swapmoe.profiler.workloads import MIX

HERE = Path(__file__).resolve().parent
PROFILE = HERE.parent / "models" / "profiles" / "e1a419fec4d32150"
ACCURACY_DIR = PROFILE / "accuracy" / "profiling-lm-3x256"
DEVICE_DIR = PROFILE / "devices" / "x86_64-bench"
MIB, GIB = 1 << 20, 1 << 30


def predicted_mix(plan: dict, searched: str) -> float:
    """The mix prediction of the model that searched ``searched``."""
    return plan["predicted_one_network"] if searched.endswith("one network") else plan["predicted"][MIX]


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
                  f"configurations (the full model among them). Plot: `benchmarks/results/plots/planning-truth.png`.", ""]
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


def parser(doc: str, texts: int):
    """The options every planning benchmark has: --quick, the judging set's size, --findings."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    p.add_argument("--texts", type=int, default=texts, help="judging texts per domain")
    p.add_argument("--tokens", type=int, default=256, help="tokens per judging text")
    p.add_argument("--findings", type=Path, help="a Markdown file for the report's 'What this shows'")
    return p


def run_and_report(name: str, args, run, report) -> None:
    """Run a planning benchmark's ``run(args)``, write its results (``RESULTS-<name>.json``) and
    the report ``report(results, command)`` makes (``.md``, with the findings), then print it.
    With ``--findings`` and a saved run, the report only is rewritten; ``--quick`` writes to a
    temporary directory."""
    saved = HERE / "results" / f"RESULTS-{name}.json"
    start = time.perf_counter()
    if args.findings and not args.quick and saved.exists():
        results = json.loads(saved.read_text())
    else:
        results = run(args)
        results["minutes"] = (time.perf_counter() - start) / 60
    if args.findings:
        results["findings"] = args.findings.read_text().strip()
    lines = report(results, f"python -m benchmarks.{name.replace('-', '_')}")
    if results.get("findings"):
        lines += ["", "## What this shows", "", results["findings"]]
    out = (Path(tempfile.mkdtemp()) if args.quick else HERE / "results") / f"RESULTS-{name}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
