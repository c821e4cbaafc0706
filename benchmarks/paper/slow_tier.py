"""Figure 1, the slow-tier case: decode speed as the tier experts come from gets slower.

The paper (section 1, Figure 1) finds naive on-demand expert loading 6.2-8.9x slower than the
model held in fast memory (SwitchT-16 on a Jetson, experts over PCIe). Here a random Mixtral whose
experts are big enough for loads to matter (4 layers x 16 experts of 24 MiB; 6 MiB in quick mode)
decodes (sampled, seeded) with the expert store read from the local disk and capped at slower bandwidths
(``ExpertStore(bandwidth=...)``), for: virtual experts (the even split at half of all experts),
on-demand LRU at the same residency (exact), on-demand with speculative prefetch of the next
layer's experts (where the executor has it), and the unmodified model held in memory (the reference,
measured beside them at every tier). Then the planner's own answer for the bundled LM: which strategy it picks at
each tier, the tier's load time per expert replacing the profiled one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from matplotlib.ticker import NullLocator

from benchmarks.paper import planned
from benchmarks.paper.context import Context
from benchmarks.paper.subjects import MG, ON_DEMAND, Setup, Subject, measure_speed
from swapmoe.executor.requests import SamplingParams
from benchmarks.paper.tables import num, share, table

MIB = 2**20
SHARE = 0.5  # of all experts resident
METHODS = ("virtual experts", "on-demand LRU", "on-demand LRU + prefetch")
PAPER = "6.2-8.9x"  # Figure 1: on-demand's latency over the model held in memory


def wide_model(ctx: Context) -> tuple[Path, int, int]:
    """The random Mixtral (built once under the store root: seeded, so the same weights every run)."""
    from benchmarks.runtime import random_mixtral
    hidden, intermediate = (512, 1024) if ctx.quick else (1024, 2048)
    final = ctx.store_root / "paper-models" / f"mixtral-{hidden}x{intermediate}"
    if not (final / "config.json").exists():
        print(f"[slow_tier] building a random Mixtral {hidden}x{intermediate} in {final}", file=sys.stderr, flush=True)
        private = final.with_name(f".{final.name}.{os.getpid()}")
        shutil.rmtree(private, ignore_errors=True)
        random_mixtral(private, hidden, intermediate)
        try:
            private.rename(final)
        except OSError:  # another run built it first
            shutil.rmtree(private, ignore_errors=True)
    return final, hidden, intermediate


def measure(ctx: Context) -> dict:
    checkpoint, hidden, intermediate = wide_model(ctx)
    tiers = (None, 100 * MIB) if ctx.quick else (None, 1000 * MIB, 300 * MIB, 100 * MIB)
    prompts = [[5 + (i * 7 + j) % 250 for j in range(16)] for i in range(2 if ctx.quick else 3)]
    new_tokens = 16 if ctx.quick else 40
    residency = (round(16 * SHARE),) * 4
    methods = METHODS
    top_k = json.loads((checkpoint / "config.json").read_text())["num_experts_per_tok"]
    out = dict(hidden=hidden, intermediate=intermediate, layers=4, experts=16, top_k=top_k, residency=list(residency),
               update_frequency=ctx.update_frequency, prompts=len(prompts), prompt_tokens=len(prompts[0]),
               new_tokens=new_tokens, tiers=[])
    full = _load(Setup(FULL), checkpoint, ctx)
    try:
        for bandwidth in tiers:
            subjects = [full] + [_load(Setup(m, experts=residency, strategy=MG if m == METHODS[0] else ON_DEMAND,
                                             update_frequency=ctx.update_frequency, prefetch=m == METHODS[2],
                                             bandwidth=bandwidth), checkpoint, ctx) for m in methods]
            try:
                runs = _interleaved(subjects, prompts, new_tokens)
            finally:
                for subject in subjects[1:]:
                    subject.close()
            out["expert_mib"] = subjects[1].runtime.layout.layers[0].bytes_per_expert / MIB
            out["tiers"].append(dict(bandwidth_mib_s=bandwidth / MIB if bandwidth else None, runs=runs))
            print(f"[slow_tier] {_tier(out['tiers'][-1]['bandwidth_mib_s'])}: " + ", ".join(
                f"{name} {r['tokens_per_second']:.1f} tokens/s" for name, r in runs.items()),
                file=sys.stderr, flush=True)
    finally:
        full.close()
    out["planner"] = planner_choices(ctx, [t["bandwidth_mib_s"] for t in out["tiers"]])
    return out


FULL = "full model (in memory)"


def _load(setup: Setup, checkpoint: Path, ctx: Context) -> Subject:
    began = time.perf_counter()
    subject = Subject(setup, checkpoint, ctx.store_root)
    subject.startup_s = time.perf_counter() - began
    sampled_speed(subject, [5, 6, 7, 8], 2, 0)  # warm-up
    return subject


def _interleaved(subjects: list[Subject], prompts, new_tokens: int) -> dict[str, dict]:
    """Each prompt through every subject in turn (each sees the same moment of a shared machine),
    the per-prompt measurements combined."""
    parts: dict[str, list[dict]] = {s.setup.name: [] for s in subjects}
    for seed, prompt in enumerate(prompts):
        for subject in subjects:
            parts[subject.setup.name].append(sampled_speed(subject, prompt, new_tokens, seed))
    return {s.setup.name: dict(combine(parts[s.setup.name]), startup_s=s.startup_s) for s in subjects}


def sampled_speed(subject: Subject, prompt: list[int], new_tokens: int, seed: int) -> dict:
    """``measure_speed`` of one prompt, sampled (temperature 1, seeded) instead of greedy: greedy
    decoding of a random model repeats one token, so every token would route to the same experts
    and no method would ever miss after the prefill; sampled tokens route as text does, token to
    token differently."""
    return measure_speed(subject, [prompt], new_tokens, SamplingParams(temperature=1.0, seed=seed))


def combine(parts: list[dict]) -> dict:
    """``measure_speed``'s numbers over several calls, as one call over all their prompts would give
    them (the inter-token median: the median of the calls')."""
    tokens = sum(p["tokens"] for p in parts)
    decoded = sum(p["tokens"] - 1 for p in parts)
    seconds = sum((p["tokens"] - 1) / p["tokens_per_second"] for p in parts if p["tokens_per_second"])
    load_s = sum(p["load_seconds"] for p in parts)
    mib = sum(p["mib_per_token"] * p["tokens"] for p in parts)
    out = {k: statistics.mean(p[k] for p in parts) for k in parts[0]}  # what is not named below
    out.update(ttft_ms=statistics.median(p["ttft_ms"] for p in parts),
               tokens_per_second=decoded / seconds if seconds else 0.0,
               itl_p50_ms=statistics.median(p["itl_p50_ms"] for p in parts),
               itl_max_ms=max(p["itl_max_ms"] for p in parts),
               loads_per_token=sum(p["loads_per_token"] * p["tokens"] for p in parts) / tokens,
               mib_per_token=mib / tokens,
               read_mib_per_s=mib / load_s if load_s else 0.0, load_seconds=load_s, tokens=tokens)
    if "peak_drawn_mib_per_s" in out:
        out["peak_drawn_mib_per_s"] = max(p["peak_drawn_mib_per_s"] for p in parts)
    return out


def planner_choices(ctx: Context, tiers: list[float | None]) -> dict:
    """The planner's strategy (all open) for the bundled LM at each tier and share: a miss costs the
    profile's measured miss plus the expert's bytes at the tier's bandwidth. And the miss time below
    which it picks on-demand (bisected, searching at each step)."""
    from benchmarks.planning_bundled import budget_for, experts_at
    from swapmoe.planner_service.search import search

    b = planned.bundled()
    objectives = b.mix
    expert_bytes = objectives.memory.layout.layers[0].bytes_per_expert
    budgets = [budget_for(b.memory, max(len(b.capacity), experts_at(s, b.capacity))) for s in ctx.shares]

    def choose(load_ns: float, budget: int):
        return search(dataclasses.replace(objectives, load_ns=load_ns), budget, b.service)

    rows = []
    for bandwidth in tiers:
        load_ns = objectives.load_ns + (expert_bytes / (bandwidth * MIB) * 1e9 if bandwidth else 0.0)
        choices = []
        for s, budget in zip(ctx.shares, budgets):
            found = choose(load_ns, budget)
            choices.append(dict(share=s, strategy=found.strategy.value,
                                inter_token_ms=found.predicted.inter_token_ns / 1e6,
                                experts_per_layer=list(found.experts_per_layer)))
        rows.append(dict(bandwidth_mib_s=bandwidth, load_ms=load_ns / 1e6, choices=choices))
    breakeven = []
    for s, budget in zip(ctx.shares, budgets):
        if ctx.quick and s != SHARE:
            continue
        low, high = math.log(1e3), math.log(1e9)  # 1 µs .. 1 s a miss
        if choose(math.exp(low), budget).strategy is not ON_DEMAND:
            breakeven.append(dict(share=s, load_ms=None))
            continue
        for _ in range(8):
            mid = (low + high) / 2
            low, high = (mid, high) if choose(math.exp(mid), budget).strategy is ON_DEMAND else (low, mid)
        breakeven.append(dict(share=s, load_ms=math.exp(low) / 1e6))
    print(f"[slow_tier] planner: {[[c['strategy'] for c in r['choices']] for r in rows]}; break-even "
          f"{[e['load_ms'] for e in breakeven]} ms", file=sys.stderr, flush=True)
    return dict(expert_kib=expert_bytes / 1024, measured_miss_ms=objectives.load_ns / 1e6,
                target_ms=b.target_ns / 1e6, compute_ms=objectives.latency.base_ns / 1e6, tiers=rows,
                breakeven=breakeven)


# --- the report ---------------------------------------------------------------------------------
def _tier(bandwidth: float | None) -> str:
    return "local disk" if bandwidth is None else f"{bandwidth:.0f} MiB/s"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _x(r: float | None) -> str:
    return "-" if r is None else f"{num(r)}x"


def _rx(a: float | None, b: float) -> str:
    """A ratio with what it is of (a ratio alone may stay put when both sides move alike)."""
    return "-" if a is None else f"{_x(_ratio(a, b))} ({num(a)} / {num(b)})"


def ratios(results: dict) -> list[dict]:
    """Per tier: virtual experts, the full model and prefetch over on-demand, and VE over the full model."""
    out = []
    for t in results["tiers"]:
        runs = t["runs"]
        full = runs[FULL]["tokens_per_second"]
        demand = runs[METHODS[1]]["tokens_per_second"]
        ve = runs[METHODS[0]]["tokens_per_second"]
        pre = runs[METHODS[2]]["tokens_per_second"] if METHODS[2] in runs else None
        out.append(dict(tier=t["bandwidth_mib_s"], ve=ve, demand=demand, full=full, prefetch=pre,
                        ve_demand=_ratio(ve, demand), full_demand=_ratio(full, demand),
                        prefetch_demand=None if pre is None else _ratio(pre, demand), ve_full=_ratio(ve, full)))
    return out


def render(results: dict, figures) -> list[str]:
    rows = []
    for t in results["tiers"]:
        full = t["runs"][FULL]
        rows += [(f"{_tier(t['bandwidth_mib_s'])}, {m}", *_speed_cells(r, None if m == FULL else full))
                 for m, r in t["runs"].items()]
    rs = ratios(results)
    ratio_rows = [(_tier(r["tier"]), _rx(r["ve"], r["demand"]), _rx(r["full"], r["demand"]), PAPER,
                   _rx(r["prefetch"], r["demand"]), _rx(r["ve"], r["full"])) for r in rs]
    p = results["planner"]
    planner_rows = [(_tier(t["bandwidth_mib_s"]), num(t["load_ms"]),
                     *(f"{c['strategy']} ({num(c['inter_token_ms'])} ms)" for c in t["choices"])) for t in p["tiers"]]
    shares = [c["share"] for c in p["tiers"][0]["choices"]] if p["tiers"] else []
    even = [row for row in p["breakeven"] if row["load_ms"] is not None]
    breakeven = "; ".join(
        f"at {share(e['share'])} it picks on-demand while a miss costs under {num(e['load_ms'])} ms"
        + (f" (a tier of at least {num(p['expert_kib'] / 1024 / ((e['load_ms'] - p['measured_miss_ms']) / 1e3))} MiB/s)"
           if e["load_ms"] > p["measured_miss_ms"] else " (less than the measured miss: never here)")
        for e in even) or "it never picks on-demand at the shares bisected, even at a 1 µs miss"
    slowest = rs[-1] if rs else {}
    capped = [t["bandwidth_mib_s"] for t in results["tiers"] if t["bandwidth_mib_s"]]
    extra = statistics.mean([_ratio(t["runs"][METHODS[2]]["mib_per_token"], t["runs"][METHODS[1]]["mib_per_token"])
                             or 0.0 for t in results["tiers"] if METHODS[2] in t["runs"]] or [0.0])
    demand_loads = statistics.mean([t["runs"][METHODS[1]]["loads_per_token"] for t in results["tiers"]] or [0.0])
    kept = {}
    if results["tiers"]:
        first, last = results["tiers"][0]["runs"], results["tiers"][-1]["runs"]
        kept = {m: _ratio(last[m]["tokens_per_second"], first[m]["tokens_per_second"]) for m in METHODS if m in first}
    prefetch = ("On-demand with prefetch guesses the next layer's experts from this layer's hidden state and "
                "loads them ahead.")
    return [
        "## A slow tier: on-demand loading against virtual experts (Figure 1)",
        "",
        f"A random Mixtral of {results['layers']} layers x {results['experts']} experts "
        f"({num(results['expert_mib'])} MiB each; hidden {results['hidden']}, intermediate {results['intermediate']}; "
        f"random weights, so speed only) decoded {results['prompts']} prompts of {results['prompt_tokens']} tokens, "
        f"{results['new_tokens']} new tokens each, sampled (temperature 1, seeded; greedy decoding of a random model "
        "repeats one token), through the serving step, the configurations taking turns "
        f"prompt by prompt, "
        f"at tiers from the local disk down to {_tier(min(capped, default=None))}. "
        f"Virtual experts and on-demand keep the same residency ({_alloc(results['residency'])} experts per layer, "
        f"half of all); virtual experts update a layer every {results['update_frequency']} tokens in the background. "
        f"{prefetch} The unmodified model, held in memory, ran beside them at every tier (its spread across tiers "
        "is the shared machine's noise). 'start-up s' is loading the model (and the resident experts, at the tier).",
        "",
        *table(("tier, method", "tokens/s (x full model's)", "TTFT ms", "inter-token p50 ms", "inter-token max ms",
                "loads/token", "MiB read/token", "start-up s"), rows),
        *table(("tier", "virtual experts / on-demand", "full model / on-demand", "paper",
                "prefetch / on-demand", "virtual experts / full model"), ratio_rows),
        _figure(results, figures),
        "",
        f"At the slowest tier virtual experts decode {_x(slowest.get('ve_demand'))} as fast as on-demand loading and "
        f"{_x(slowest.get('ve_full'))} as fast as the model held in memory; the model in memory is "
        f"{_x(slowest.get('full_demand'))} as fast as on-demand there (the paper's Figure 1: {PAPER}). From the "
        f"local disk to the slowest tier virtual experts keep {_x(kept.get(METHODS[0]))} of their tokens/s, on-demand "
        f"{_x(kept.get(METHODS[1]))}"
        + (f", on-demand with prefetch {_x(kept.get(METHODS[2]))}" if METHODS[2] in kept else "")
        + (f"; prefetch read {_x(extra)} the bytes per token that on-demand alone did (the loads of its guesses "
           "share the tier with the misses')" if extra else "")
        + ". Virtual experts compute each token with the experts already resident and load in the background; "
        "an on-demand miss blocks its token for the expert's bytes at the tier's bandwidth. On-demand loaded "
        f"{num(demand_loads)} experts per generated token (prefill's loads included) of the "
        f"{results['layers'] * results['top_k']} it routes to: this random model's routers favour a few experts "
        "per layer, so an LRU cache of half of them mostly hits (the paper's naive on-demand loading caches none).",
        "",
        f"**Which strategy the planner picks per tier** (the bundled LM, mix workload, planner search with "
        f"virtual experts and on-demand both open; a miss costs the profile's measured {num(p['measured_miss_ms'])} ms "
        f"plus the {num(p['expert_kib'])} KiB expert at the tier's bandwidth; latency target {num(p['target_ms'])} ms "
        f"a token, compute {num(p['compute_ms'])} ms; predicted inter-token time in brackets):",
        "",
        *table(("tier", "miss ms", *(f"at {share(s)}" for s in shares)), planner_rows),
        f"Bisecting the miss time (a search at each step): {breakeven}. The bundled LM's experts are small "
        f"({num(p['expert_kib'])} KiB: {num(p['expert_kib'] / 1024 / (p['measured_miss_ms'] / 1e3))} MiB/s at the "
        "measured miss time), so a miss costs mostly its fixed part; on-demand (exact) can only be the better plan "
        "where the misses left at a budget, times the miss time, fit in the latency target's slack over compute.",
        "",
    ]


def _alloc(xs) -> str:
    return ", ".join(f"{x:.4g}" for x in xs)


def _speed_cells(r: dict, full: dict | None) -> tuple:
    """A row's cells; ``full`` None: the full model's own row (no ratio to itself, no expert reads)."""
    speed = num(r["tokens_per_second"])
    if full is not None:
        speed += f" ({_x(_ratio(r['tokens_per_second'], full['tokens_per_second']))})"
    reads = ("-", "-") if full is None else (num(r["loads_per_token"]), num(r["mib_per_token"]))
    return (speed, num(r["ttft_ms"]), num(r["itl_p50_ms"]), num(r["itl_max_ms"]),
            *reads, num(r.get("startup_s", 0.0)))


def _figure(results: dict, figures) -> str:
    capped = [t["bandwidth_mib_s"] for t in results["tiers"] if t["bandwidth_mib_s"]]
    local = max(capped, default=250.0) * 4  # where the uncapped disk goes on the axis
    xs = [t["bandwidth_mib_s"] or local for t in results["tiers"]]
    figure, axes = figures.new(columns=2, width=4.8, height=3.4)
    left, right = axes[0]
    for method, style in zip((*METHODS, FULL), ("o-", "s-", "^-", "x--")):
        points = [(x, t["runs"][method]) for x, t in zip(xs, results["tiers"]) if method in t["runs"]]
        colour = dict(color="black") if method == FULL else {}
        if points:
            left.plot([x for x, _ in points], [r["tokens_per_second"] for _, r in points], style, label=method,
                      **colour)
            right.plot([x for x, _ in points], [r["itl_max_ms"] for _, r in points], style, label=method, **colour)
    for ax, label in ((left, "decode tokens/s"), (right, "longest inter-token gap (ms)")):
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([_tier(t["bandwidth_mib_s"]).replace(" MiB/s", "") for t in results["tiers"]])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("expert tier bandwidth (MiB/s)")
        ax.set_ylabel(label)
    left.set_ylim(bottom=0)
    right.set_yscale("log")
    left.legend(fontsize=7)
    return figures.save(figure, "slow_tier_speed",
                        "Decode tokens/s and the longest inter-token gap against the tier's bandwidth, per method")


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    rs = ratios(results)
    if not rs:
        return []
    slow, fast = rs[-1], rs[0]
    full_demand = slow["full_demand"] or 0.0
    ve_ok = (slow["ve_demand"] or 0.0) > 1 and min(r["ve_full"] or 0.0 for r in rs) >= 0.7
    rows = [
        ("On-demand expert loading makes decoding several times slower than the model in fast memory",
         f"{PAPER} the latency (Figure 1, SwitchT-16 on a Jetson)",
         f"full model / on-demand tokens/s: {_x(fast['full_demand'])} at {_tier(fast['tier'])}, "
         f"{_x(slow['full_demand'])} at {_tier(slow['tier'])}",
         "yes" if full_demand >= 6.2 else ("partly" if full_demand >= 1.5 else "no")),
        ("Virtual experts take loads off the critical path: near the full model's speed at a slow tier",
         "latency like the pruned model's (Figure 7)",
         f"virtual experts / on-demand: {_x(slow['ve_demand'])} at {_tier(slow['tier'])}; "
         f"virtual experts / full model: {_x(min(r['ve_full'] or 0.0 for r in rs))} at worst",
         "yes" if ve_ok else "no"),
    ]
    if slow["prefetch_demand"] is not None:
        rows.append(("Speculative prefetch narrows on-demand's gap (ours, not the paper's)", "not studied",
                     f"prefetch / on-demand tokens/s: {_rx(slow['prefetch'], slow['demand'])} at {_tier(slow['tier'])}",
                     "yes" if slow["prefetch_demand"] > 1.05 else "no"))
    p = results["planner"]
    known = [e for e in p["breakeven"] if e["load_ms"] is not None]
    rows.append(("On-demand (exact) is the better plan only where a miss is cheap (ours: the planner's choice)",
                 "not studied (virtual experts throughout)",
                 "break-even miss "
                 + (", ".join(f"{num(e['load_ms'])} ms at {share(e['share'])}" for e in known) or "none")
                 + f"; a miss here costs {num(p['tiers'][0]['load_ms'])}-{num(p['tiers'][-1]['load_ms'])} ms",
                 "yes" if known else "no"))
    return rows
