"""Figure 9: the planner's per-layer expert allocations at each budget and workload.

The paper (section 4, Figure 9) shows that for language modelling SwapMoE "tends to maintain more
experts in the middle layers", and that the distribution "differs in different tasks". Here the
planner service's search (``planned.plan``: the bundled LM's shipped profile, its objectives, its
genetic search) plans every budget share for every workload of the profile; no model runs. We
report the allocations, where in the network they put experts (the first, middle and last third of
the layers against the even split's share), how far apart the workloads' plans are (L1 distance
between allocations, in experts), and how long planning takes (the paper: about 5 s).
"""

from __future__ import annotations

import sys
import time

from benchmarks.paper import planned
from benchmarks.paper.context import Context
from benchmarks.paper.tables import num, pct, share, table

THIRDS = ("first", "middle", "last")


def measure(ctx: Context) -> dict:
    capacity = list(planned.capacity())
    plans: dict[str, list[dict]] = {}
    for workload in planned.workloads():
        plans[workload] = []
        for s in ctx.shares:
            began = time.perf_counter()
            found = planned.plan(s, workload)
            seconds = time.perf_counter() - began
            plans[workload].append(dict(found.to_json(), seconds=seconds))
            print(f"[plans] {workload} {share(s)}: {list(found.experts_per_layer)} F={found.update_frequency} "
                  f"{found.strategy} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return dict(capacity=capacity, shares=list(ctx.shares),
                even=[list(planned.even_split(s)) for s in ctx.shares], plans=plans)


# --- derived numbers (pure functions of the results) ------------------------------------------
def thirds(layers: int) -> list[list[int]]:
    """Layer indices of the first, middle and last third (the middle one gets the remainder's
    centre: 6 layers -> 0-1, 2-3, 4-5)."""
    cut = [round(layers * k / 3) for k in range(4)]
    return [list(range(cut[k], cut[k + 1])) for k in range(3)]


def third_shares(allocation: list[float]) -> list[float]:
    """The share of all allocated experts in each third of the layers."""
    total = sum(allocation) or 1.0
    return [sum(allocation[i] for i in part) / total for part in thirds(len(allocation))]


def l1(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b))


def _pairs(results: dict) -> list[tuple[str, str]]:
    names = list(results["plans"])
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def middle_gain(results: dict, workload: str | None = None) -> tuple[float, float]:
    """Mean over budgets of the middle third's share of experts in the plans of ``workload`` (None:
    every workload), and the even split's."""
    planned_shares, even_shares = [], []
    for name, rows in results["plans"].items():
        if workload is None or name == workload:
            for row, even in zip(rows, results["even"]):
                planned_shares.append(third_shares(row["experts_per_layer"])[1])
                even_shares.append(third_shares(even)[1])
    return _mean(planned_shares), _mean(even_shares)


def mean_distance(results: dict) -> tuple[float, float]:
    """Mean L1 distance between two workloads' allocations at the same budget, and the mean
    number of experts allocated per plan (for scale)."""
    distances = [l1(results["plans"][a][k]["experts_per_layer"], results["plans"][b][k]["experts_per_layer"])
                 for a, b in _pairs(results) for k in range(len(results["even"]))]
    totals = [sum(r["experts_per_layer"]) for rows in results["plans"].values() for r in rows]
    return _mean(distances), _mean(totals)


def kept_share(results: dict) -> list[float]:
    """Per layer: the mean share of its capacity that the plans keep."""
    plans = [r["experts_per_layer"] for rows in results["plans"].values() for r in rows]
    return [_mean([p[i] / (c or 1) for p in plans]) for i, c in enumerate(results["capacity"])]


def _favoured(results: dict) -> str:
    shares = kept_share(results)
    order = sorted(range(len(shares)), key=lambda i: -shares[i])
    return ", ".join(f"layer {i} {pct(shares[i])}" for i in order)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _alloc(xs: list[float]) -> str:
    return ", ".join(f"{x:.4g}" for x in xs)


# --- the report ---------------------------------------------------------------------------------
def render(results: dict, figures) -> list[str]:
    layers = len(results["capacity"])
    parts = thirds(layers)
    span = [f"{p[0]}-{p[-1]}" if len(p) > 1 else (str(p[0]) if p else "none") for p in parts]
    rows = []
    for workload, plans in results["plans"].items():
        for row, even in zip(plans, results["even"]):
            got, flat = third_shares(row["experts_per_layer"]), third_shares(even)
            rows.append((f"{workload}, {share(row['share'])}", _alloc(row["experts_per_layer"]),
                         _alloc([sum(row["experts_per_layer"])]), _alloc([row["update_frequency"]]), row["strategy"],
                         num(row["predicted_accuracy"]), *(f"{pct(g)} ({pct(e)})" for g, e in zip(got, flat)),
                         num(row["seconds"])))
    even_rows = [(f"even split, {share(s)}", _alloc(e), _alloc([sum(e)]))
                 for s, e in zip(results["shares"], results["even"])]
    middle, even_middle = middle_gain(results)
    mix_middle, mix_even = middle_gain(results, "mix") if "mix" in results["plans"] else (middle, even_middle)
    distance, total = mean_distance(results)
    times = [r["seconds"] for rows_ in results["plans"].values() for r in rows_]
    lines = [
        "## Per-layer allocations the planner picks (Figure 9)",
        "",
        f"The planner service's search (the bundled LM's shipped profile and objectives, its genetic search, the "
        f"default latency target) planned each budget for each workload of the profile; no model ran. "
        f"The model has {layers} MoE layers of {_alloc(results['capacity'])} experts; a budget is a share of all "
        f"experts' bytes. Each plan is the virtual-experts plan; 'strategy' is what the planner picks with "
        f"on-demand loading open as well. Thirds of the layers: first {span[0]}, middle {span[1]}, last "
        f"{span[2]}; each third's share of the plan's experts, the even split's in brackets.",
        "",
        *table(("workload, budget", "experts per layer", "experts", "update every F tokens", "strategy",
                "predicted perplexity", "first third", "middle third", "last third", "planning s"), rows),
        *table(("even split (the paper's 'simple planning')", "experts per layer", "experts"), even_rows),
        _figure(results, figures),
        "",
        *table(("workload pair", *(f"L1 at {share(s)}" for s in results["shares"])), _distance_rows(results)),
        f"On this model the planner puts {pct(middle)} of the experts in the middle third on average over "
        f"workloads and budgets (mix alone: {pct(mix_middle)}), against the even split's {pct(even_middle)}: "
        + ("the middle layers get more than their share, as in the paper's Figure 9(a)." if middle > even_middle else
           "the middle layers get less than their share, unlike the paper's Figure 9(a).") + " "
        f"Kept the most, as a share of their capacity over all plans: {_favoured(results)}. "
        f"Two workloads' plans at the same budget differ by {num(distance)} experts in L1 distance on average "
        f"(of {num(total)} per plan): the allocation depends on the task, as the paper found. Planning one "
        f"budget (two searches: the virtual-experts plan, and the strategy with on-demand open) took "
        f"{num(_mean(times))} s on average, at most {num(max(times, default=0.0))} s (the paper: about 5 s).",
        "",
    ]
    return lines


def _distance_rows(results: dict) -> list[tuple]:
    rows = []
    for a, b in _pairs(results):
        rows.append((f"{a} vs {b}", *(_alloc([l1(x["experts_per_layer"], y["experts_per_layer"])])
                                      for x, y in zip(results["plans"][a], results["plans"][b]))))
    for name, plans in results["plans"].items():
        rows.append((f"{name} vs even split", *(_alloc([l1(x["experts_per_layer"], e)])
                                                 for x, e in zip(plans, results["even"]))))
    return rows


def _figure(results: dict, figures) -> str:
    names = list(results["plans"])
    figure, axes = figures.new(columns=max(1, len(names)), width=3.6, height=3.2)
    layers = len(results["capacity"])
    count = max(1, len(results["shares"]))
    width = 0.8 / count
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for ax, name in zip(axes[0], names):
        for k, (row, even) in enumerate(zip(results["plans"][name], results["even"])):
            colour = colours[k % len(colours)]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(layers)]
            ax.bar(xs, row["experts_per_layer"], width=width, color=colour, label=f"{share(row['share'])} budget")
            ax.hlines(even, [i - 0.4 for i in range(layers)], [i + 0.4 for i in range(layers)], colors=colour,
                      linestyles="dashed", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("MoE layer")
        ax.set_xticks(range(layers))
        ax.set_ylim(0, max(results["capacity"], default=1) * 1.08)
    axes[0][0].set_ylabel("virtual experts")
    axes[0][0].legend(fontsize=7, loc="upper right")
    return figures.save(figure, "plans_per_layer",
                        "Experts per layer in the planner's plans, a panel per workload, a bar per budget "
                        "(dashed: the even split at that budget)")


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    middle, even_middle = middle_gain(results)
    distance, total = mean_distance(results)
    times = [r["seconds"] for rows in results["plans"].values() for r in rows]
    return [
        ("The planner keeps more experts in the middle layers for language modelling",
         "Figure 9(a): more experts in the middle layers",
         f"middle third of the layers holds {pct(middle)} of the planned experts (even split: {pct(even_middle)})",
         "yes" if middle > even_middle else "no"),
        ("The per-layer allocation differs between tasks",
         "\"differs in different tasks\" (Figure 9)",
         f"mean L1 distance between two workloads' plans: {num(distance)} experts of {_alloc([total])}",
         "yes" if distance >= 1 else "no"),
        ("Generating a plan for a budget is quick",
         "about 5 s per constraint",
         f"{num(_mean(times))} s per budget on average, at most {num(max(times, default=0.0))} s",
         "yes" if max(times, default=0.0) <= 5 else "no"),
    ]
