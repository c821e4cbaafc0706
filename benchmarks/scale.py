"""Paper scale: the executor serving the paper's SwitchT-64 and OLMoE-1B-7B in a few GiB.

    python -m benchmarks.scale olmoe-1b-7b          # 15-25 min here; writes RESULTS-scale.md
    python -m benchmarks.scale switch-base-64
    python -m benchmarks.scale --report             # re-render the report from RESULTS-scale.json

The checkpoint is written on demand by ``swapmoe.models.paper_scale`` (shape-exact, random
weights: memory, time and I/O are those of the real model, accuracy is not measured here) into
``--checkpoints`` (never into the repository). Each measurement runs in a fresh process
(``benchmarks.scale_probe``): the store built from scratch, then per budget the executor with
virtual experts (the planner's plan from ``--plans``, else its even split), pruning (the even
split, never updated) and on-demand loading (the even split as an LRU cache: exact), at this
machine's disk and at a flash-speed tier (``--flash``, the executor's ``--load-bandwidth``), and
the full model where it fits in memory; ``--side-by-side N`` then alternates virtual experts and
the full model N times for a ratio measured side by side. Results are kept
per model in RESULTS-scale.json as each run finishes, so an interrupted run loses one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-scale.md"
GiB, MiB = 2**30, 2**20
FLASH = 200 * MiB  # an edge device's flash (eMMC class), as benchmarks.runtime's capped rows; this disk reads ~800 MiB/s
MODELS = {  # budgets: the paper's point for SwitchT-64 ("min": the executor's own minimum)
    "switch-base-64": dict(budgets=(int(4.7 * GiB), "min"), tokens=16),
    "switch-base-32": dict(budgets=(int(3.5 * GiB), "min"), tokens=16),
    "switch-base-16": dict(budgets=(int(2.5 * GiB), "min"), tokens=16),
    "olmoe-1b-7b": dict(budgets=(4 * GiB, 2 * GiB), tokens=16),
}


def probe(function: str, **kwargs) -> dict:
    """``benchmarks.scale_probe.<function>(**kwargs)`` in a fresh process; its JSON result."""
    from benchmarks.memory import in_fresh_process

    code = (f"import json;from benchmarks import scale_probe as p;"
            f"print(json.dumps(p.{function}(**json.loads({json.dumps(json.dumps(kwargs))}))))")
    return in_fresh_process(code, f"{function}({kwargs})")


def runs_for(budgets: list[int], full_bytes: int, memory_bytes: int, flash: int) -> list[tuple[int, str, int]]:
    """(budget, method, bandwidth) to measure: every method at both tiers, pruning once (it loads
    nothing while serving), and the full model once where it fits in memory."""
    runs = []
    for budget in budgets:
        runs += [(budget, "virtual experts", 0), (budget, "virtual experts", flash),
                 (budget, "on-demand", 0), (budget, "on-demand", flash), (budget, "pruning", 0)]
    if full_bytes < 0.8 * memory_bytes:
        runs.append((full_bytes, "full model", 0))
    return runs


def measure(name: str, checkpoints: Path, store_root: Path, flash: int, tokens: int | None,
            results_path: Path, plans: dict, reuse_store: bool = False, matrix: bool = True,
            side_by_side: int = 0) -> dict:
    import psutil

    checkpoint = checkpoints / name
    if not (checkpoint / "config.json").exists():
        print(f"writing the {name} checkpoint into {checkpoint} (random weights, once)")
        subprocess.run([sys.executable, "-m", "swapmoe.models.paper_scale", name, str(checkpoint)], check=True)
    results = _load(results_path)
    entry = results.setdefault(name, {})
    entry["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    if not (reuse_store and entry.get("build") and store_root.exists()):
        shutil.rmtree(store_root, ignore_errors=True)
        print(f"building the expert store of {name} from scratch")
        entry["build"] = probe("build", checkpoint=str(checkpoint), store_root=str(store_root))
    entry["min_budget"] = probe("min_budget", checkpoint=str(checkpoint), store_root=str(store_root))["min_budget"]
    budgets = [entry["min_budget"] if b == "min" else b for b in MODELS[name]["budgets"]]
    full = entry["min_budget"] + entry["checkpoint_bytes"]  # every expert resident, the rest as at the minimum
    runs = runs_for(budgets, full, psutil.virtual_memory().total, flash) if matrix else []
    # Virtual experts at the first budget and the full model, alternately: a ratio measured side by side.
    pairs = [(budgets[0], "virtual experts", 0), (full, "full model", 0)] * side_by_side
    for key, todo in (("runs", runs), ("side_by_side", pairs)):
        if not todo:
            continue
        entry[key] = []
        _save(results_path, results)
        for budget, method, bandwidth in tqdm(todo, desc=f"serving {name} ({key})", unit="run"):
            plan = plans.get(str(budget), {}) if method == "virtual experts" else {}
            row = probe("serve", checkpoint=str(checkpoint), store_root=str(store_root), budget=budget,
                        method=method, bandwidth=bandwidth, tokens=tokens or MODELS[name]["tokens"],
                        plan=plan.get("experts_per_layer"), update_frequency=plan.get("update_frequency", 4))
            row["plan_origin"] = plan.get("origin", "the executor's default plan (an even split)")
            entry[key].append(row)
            _save(results_path, results)
    return entry


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", choices=sorted(MODELS), help="the paper-scale model to measure")
    parser.add_argument("--checkpoints", type=Path, default=Path.home() / ".cache" / "swapmoe" / "checkpoints",
                        help="where checkpoints are written on demand (default ~/.cache/swapmoe/checkpoints)")
    parser.add_argument("--store-root", type=Path, default=None,
                        help="where the expert store is built (default: a scale-stores folder beside the checkpoints)")
    parser.add_argument("--flash", type=float, default=FLASH / MiB, help="the flash tier's bandwidth, MiB/s (200)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 16)")
    parser.add_argument("--plans", type=Path, default=None,
                        help="JSON {budget bytes: {experts_per_layer, update_frequency, origin}}: the planner's plans "
                             "(benchmarks.scale_system writes it); else the executor's default plan")
    parser.add_argument("--reuse-store", action="store_true",
                        help="keep a store built by an earlier run and its build figures (else it is rebuilt and timed)")
    parser.add_argument("--side-by-side", type=int, default=0, metavar="N",
                        help="then run virtual experts (first budget, local disk) and the full model alternately N "
                             "times each: their ratio measured side by side")
    parser.add_argument("--no-matrix", action="store_true", help="skip the matrix (with --side-by-side)")
    parser.add_argument("--report", action="store_true", help="only re-render the report from the JSON")
    args = parser.parse_args(argv)
    from benchmarks.scale_report import render

    results_path = REPORT.with_suffix(".json")
    if not args.report:
        if args.model is None:
            parser.error("name a model, or --report")
        plans = json.loads(args.plans.read_text()) if args.plans else {}
        store_root = args.store_root or args.checkpoints.parent / "scale-stores"
        measure(args.model, args.checkpoints, store_root, int(args.flash * MiB), args.tokens, results_path, plans,
                args.reuse_store, not args.no_matrix, args.side_by_side)
    report = render(_load(results_path))
    print(report)
    REPORT.write_text(report)
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
