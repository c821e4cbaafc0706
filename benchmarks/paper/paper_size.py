"""Table 1 at the paper's size: SwitchT-16 (switch-base-16, 4.0 GiB of float32 weights, shape-exact
with random weights: memory, time and I/O are the real model's, quality is not measured) served
by the executor at the paper's budgets, beside the paper's own Table 1.

Each row is ``benchmarks.scale_probe.serve`` in a fresh process: the engine under the budget
with virtual experts (its even split: no accuracy profile exists for random weights), pruning
(the same split, never updated), on-demand loading (the same slots as an LRU cache: exact), and
the full model. ``--quick`` runs the same code on the model's ``tiny`` scale.
"""

from __future__ import annotations

import sys

from benchmarks.paper.context import Context
from benchmarks.paper.tables import num, table

NAME = "switch-base-16"
GiB = 2**30
BUDGETS_GIB = (2.0, 3.0, 4.0)  # of the paper's Table 1 (2.0, 3.0, 3.5, 4.0)
PAPER = {2.0: "1.64 GiB, 0.45 s", 3.0: "2.74 GiB, 0.65 s", 3.5: "3.58 GiB, 0.76 s", 4.0: "3.99 GiB, 0.80 s"}
PAPER_ORIGINAL = "4.08 GiB, 0.82 s"
METHODS = ("virtual experts", "pruning", "on-demand")


def measure(ctx: Context) -> dict:
    from benchmarks.scale import probe
    from swapmoe.models.paper_scale import parse_scale, write_checkpoint

    scale = parse_scale("tiny", NAME) if ctx.quick else None
    checkpoint = ctx.store_root / "paper-models" / (NAME + ("-tiny" if ctx.quick else ""))
    if not (checkpoint / "config.json").exists():
        print(f"[paper] writing {checkpoint} (random weights, once)", file=sys.stderr, flush=True)
        write_checkpoint(NAME, checkpoint, scale)
    store_root = ctx.store_root / "paper-stores" / checkpoint.name
    build = probe("build", checkpoint=str(checkpoint), store_root=str(store_root))
    least = probe("min_budget", checkpoint=str(checkpoint), store_root=str(store_root))["min_budget"]
    weights = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    budgets = [least, int(least + 0.5 * weights)] if ctx.quick else [int(b * GiB) for b in BUDGETS_GIB]
    runs = [(b, m) for b in budgets for m in METHODS] + [(least + weights, "full model")]
    rows = []
    for budget, method in runs:
        print(f"[paper] {checkpoint.name}: {method} at {budget / GiB:.2f} GiB", file=sys.stderr, flush=True)
        row = probe("serve", checkpoint=str(checkpoint), store_root=str(store_root), budget=budget, method=method,
                    bandwidth=0, tokens=16)
        rows.append({k: row[k] for k in ("method", "budget", "plan", "accounted", "peak_above_libraries",
                                          "libraries", "ttft", "seconds", "tokens", "loads", "read_bytes",
                                          "read_seconds", "constructed")})
    return dict(model=checkpoint.name, weights_bytes=weights, min_budget=least, store_bytes=build["store_bytes"],
                build_seconds=build["seconds"], rows=rows, paper_budgets=not ctx.quick)


def render(results: dict, figures) -> list[str]:
    rows = results["rows"]
    unit, scale = ("GiB", GiB) if results["weights_bytes"] >= GiB else ("MiB", 2**20)
    lines = [
        f"## Paper size: {results['model']} under the paper's budgets (Table 1)", "",
        f"{num(results['weights_bytes'] / scale)} {unit} of float32 weights, random (memory, time and I/O are the real "
        f"model's; Rouge-2 is not). The expert store was built in {num(results['build_seconds'])} s "
        f"({num(results['store_bytes'] / scale)} {unit}: the external memory); the executor's minimum budget "
        f"is {num(results['min_budget'] / scale)} {unit}. Each row serves two summaries of 16 tokens in a fresh process "
        "(the second timed); peak is the process's above the imported libraries. The paper's memory is peak GPU "
        "memory on a Jetson, its latency one summary's.", "",
    ]
    lines += table(("method", f"budget {unit}", "experts kept", f"accounted {unit}", f"peak {unit}",
                    "latency s", "TTFT s", "expert MiB read", "paper (vExperts / original)"),
                   [(r["method"], num(r["budget"] / scale), f"{num(sum(r['plan']) / len(r['plan']), 3)} per layer",
                     num(r["accounted"] / scale), num(r["peak_above_libraries"] / scale), num(r["seconds"]),
                     num(r["ttft"]), num(r["read_bytes"] / 2**20), _paper(results, r)) for r in rows])
    fig, axes = figures.new(2)
    for method in (*METHODS, "full model"):
        mine = [r for r in rows if r["method"] == method]
        axes[0][0].plot([r["budget"] / scale for r in mine], [r["seconds"] for r in mine], marker="o", label=method)
        axes[0][1].plot([r["budget"] / scale for r in mine], [r["peak_above_libraries"] / scale for r in mine],
                        marker="o", label=method)
    axes[0][0].set_ylabel("latency of a 16-token summary (s)")
    axes[0][1].set_ylabel(f"peak memory above libraries ({unit})")
    for ax in axes[0]:
        ax.set_xlabel(f"budget ({unit})")
    axes[0][0].legend(fontsize=7)
    lines += [figures.save(fig, "paper_size", f"{results['model']}: latency and memory per budget"), ""]
    return lines


def _paper(results: dict, row: dict) -> str:
    if not results["paper_budgets"]:
        return "-"
    if row["method"] == "full model":
        return PAPER_ORIGINAL
    return PAPER.get(round(row["budget"] / GiB, 1), "-") if row["method"] == "virtual experts" else "-"


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    rows = results["rows"]
    ve = [r for r in rows if r["method"] == "virtual experts"]
    full = next(r for r in rows if r["method"] == "full model")
    over = [r for r in ve if r["accounted"] > r["budget"]]
    low = min(ve, key=lambda r: r["budget"])
    return [("At the paper's size, memory follows the budget and latency falls with it",
             "SwitchT-16: 2.0 GiB budget -> 1.64 GiB, 0.45 s; original 4.08 GiB, 0.82 s",
             f"{num(low['budget'] / GiB)} GiB budget -> {num(low['accounted'] / GiB)} GiB accounted, "
             f"{num(low['seconds'])} s; full model {num(full['accounted'] / GiB)} GiB, {num(full['seconds'])} s",
             "yes" if not over and low["seconds"] <= full["seconds"] else "partly" if not over else "no")]
