"""RESULTS-scale.md from RESULTS-scale.json (``benchmarks.scale``): tables per model, and the
issue's goals checked against the figures."""

from __future__ import annotations

import statistics

GiB, MiB = 2**30, 2**20


def _tier(row: dict) -> str:
    return f"flash {row['bandwidth'] / MiB:.0f} MiB/s" if row["bandwidth"] else "local disk"


def _runs_table(entry: dict, encoder_decoder: bool) -> list[str]:
    speed = "summary latency s" if encoder_decoder else "tokens/s"
    head = (f"| budget | method | storage | experts resident | start-up to first token s | accounted GiB | "
            f"peak RSS above libraries GiB | time to first token s | {speed} | loads/token | read MiB/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in entry["runs"]:
        total = sum(r["plan"])
        speed_value = f"{r['seconds']:.2f}" if encoder_decoder else f"{r['tokens_per_s']:.2f}"
        read = r["read_bytes"] / MiB / r["read_seconds"] if r["read_seconds"] else 0.0
        over = " **over**" if r["peak_above_libraries"] > r["budget"] else ""
        lines.append(f"| {r['budget'] / GiB:.2f} GiB | {r['method']} | {_tier(r)} | {total} | "
                     f"{r['startup_to_first_token']:.1f} | {r['accounted'] / GiB:.2f} | "
                     f"{r['peak_above_libraries'] / GiB:.2f}{over} | {r['ttft']:.2f} | {speed_value} | "
                     f"{r['loads'] / max(1, r['tokens']):.1f} | {read:.0f} |")
    return lines


def _find(entry: dict, budget: int, method: str, flash: bool | None = None) -> dict | None:
    return next((r for r in entry["runs"] if r["method"] == method and (budget is None or r["budget"] == budget)
                 and (flash is None or bool(r["bandwidth"]) == flash)), None)


def goals(results: dict) -> list[str]:
    """The issue's goals, each stated with the figures that meet or miss it."""
    out = []
    switch = results.get("switch-base-64")
    if switch and switch.get("runs"):
        budget = int(4.7 * GiB)
        ours = [r for r in switch["runs"] if r["budget"] == budget]
        worst = max((r["peak_above_libraries"] for r in ours), default=0)
        out.append(f"- SwitchT-64 in 4.7 GiB, peak RSS above the libraries never over the budget: "
                   f"{'met' if worst <= budget else 'missed'} (worst {worst / GiB:.2f} GiB of {len(ours)} runs; "
                   "the paper's own run: 3.58 GiB for a 3.5 GiB budget).")
        paired = _medians(switch.get("side_by_side", []))
        ve, full = _find(switch, budget, "virtual experts", False), _find(switch, None, "full model")
        if paired:
            ve, full, how = paired["virtual experts"], paired["full model"], "medians side by side"
        else:
            how = "one run each"
        if ve and full:
            out.append(f"- SwitchT-64 in 4.7 GiB, a summary's latency at most the full model's: "
                       f"{'met' if ve['seconds'] <= full['seconds'] else 'missed'} ({ve['seconds']:.2f} s against "
                       f"{full['seconds']:.2f} s for the full model in {full['accounted'] / GiB:.1f} GiB; {how}).")
    olmoe = results.get("olmoe-1b-7b")
    if olmoe and olmoe.get("runs"):
        budget = 4 * GiB
        ve, od = _find(olmoe, budget, "virtual experts", True), _find(olmoe, budget, "on-demand", True)
        if ve and od:
            ratio = ve["tokens_per_s"] / od["tokens_per_s"] if od["tokens_per_s"] else float("inf")
            out.append(f"- OLMoE-1B-7B in 4 GiB at >= 2x on-demand's tokens/s at the flash tier: "
                       f"{'met' if ratio >= 2 else 'missed'} ({ve['tokens_per_s']:.2f} against "
                       f"{od['tokens_per_s']:.2f} tokens/s: {ratio:.1f}x).")
        build = olmoe["build"]
        out.append(f"- OLMoE-1B-7B's store built in under 10 minutes with peak RSS under the budget: "
                   f"{'met' if build['seconds'] < 600 and build['peak_above_libraries'] < budget else 'missed'} "
                   f"({build['seconds'] / 60:.1f} min, peak {build['peak_above_libraries'] / MiB:.0f} MiB above "
                   "the libraries).")
    return out


def _medians(rows: list[dict]) -> dict[str, dict]:
    """Per method, the median of each figure over its runs."""
    out = {}
    for method in {r["method"] for r in rows}:
        runs = [r for r in rows if r["method"] == method]
        out[method] = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "tokens_per_s", "ttft",
                                                                           "accounted", "peak_above_libraries")}
    return out


def _side_by_side(entry: dict, encoder_decoder: bool) -> list[str]:
    rows = entry.get("side_by_side", [])
    if not rows:
        return []
    figure = "seconds" if encoder_decoder else "tokens_per_s"
    lines = [f"Side by side (`--side-by-side {len(rows) // 2}`: virtual experts at {rows[0]['budget'] / GiB:.2f} GiB "
             f"from the local disk and the full model, alternately), {'summary latency s' if encoder_decoder else 'tokens/s'}:", ""]
    for method, median in sorted(_medians(rows).items()):
        each = ", ".join(f"{r[figure]:.2f}" for r in rows if r["method"] == method)
        lines.append(f"- {method}: median {median[figure]:.2f} ({each}); peak RSS above the libraries "
                     f"{median['peak_above_libraries'] / GiB:.2f} GiB")
    return lines + [""]


def render(results: dict) -> str:
    lines = ["# Paper scale: the executor serving 14 GiB MoE models in a few GiB", "",
             "`python -m benchmarks.scale MODEL` (see its docstring). Checkpoints are shape-exact with random weights "
             "(`swapmoe.models.paper_scale`): memory, time and I/O are the real models', accuracy is not measured. "
             "Each row is a fresh process on this machine (2 cores, no GPU); 'above libraries' is VmHWM minus the "
             "RSS once torch, transformers and the model's modeling module are imported. Time to first token and "
             "speed are of a second request (the first one's is in 'start-up to first token').", ""]
    for name, entry in results.items():
        encoder_decoder = name.startswith("switch")
        build = entry.get("build", {})
        lines += [f"## {name}", "",
                  f"Checkpoint {entry['checkpoint_bytes'] / GiB:.2f} GiB; expert store built from scratch in "
                  f"{build.get('seconds', 0):.0f} s with peak RSS {build.get('peak_above_libraries', 0) / MiB:.0f} MiB "
                  f"above the libraries ({build.get('libraries', 0) / MiB:.0f} MiB); the executor's minimum budget "
                  f"{entry.get('min_budget', 0) / GiB:.2f} GiB.", ""]
        if entry.get("runs"):
            origins = sorted({r["plan_origin"] for r in entry["runs"] if r["method"] == "virtual experts"})
            lines += _runs_table(entry, encoder_decoder) + [
                "", f"Virtual experts' plan: {'; '.join(origins)}. Pruning and on-demand keep the executor's even "
                "split of the same budget (an LRU cache or a pruned model does best with as many slots in every "
                "layer); the full model keeps every expert.", ""]
        lines += _side_by_side(entry, encoder_decoder)
    lines += ["## Goals", ""] + (goals(results) or ["- no model measured yet"]) + [""]
    return "\n".join(lines)
