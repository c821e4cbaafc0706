"""Measured before pushed: what verifying near-tied plans costs, and what it buys.

    python -m benchmarks.planning_verify           # ~6 min on 2 cores; writes benchmarks/results/RESULTS-planning-verify.{md,json}
    python -m benchmarks.planning_verify --quick   # a smoke run: prints, writes nothing

The bundled LM with its stored profiles (as ``benchmarks.planning``), one stream, the planner's
default latency target. At each budget the search's best ``--candidates`` plans are ranked; those
predicted within E_accuracy's held-out error of the first are scored on the profiling set
(``planner_service.verification``, as ``swapmoe planner serve --verify N`` does) and the best
measured is kept. Then the search's first plan and the verified pick are both scored on the
judging half of the data, which neither the models nor the verification saw: whether the
verified pick is better where it differs, and what the verification cost in seconds.
"""

from __future__ import annotations

import os
import platform
import time

from tqdm import tqdm

from swapmoe.models.bundled import LM_DIR
from swapmoe.planner_service import profiles
from swapmoe.planner_service.search import SearchSettings, candidates
from swapmoe.planner_service.verification import Verifier, configuration, verify
from swapmoe.profiler.workloads import MIX, ProfilingSet

from benchmarks.planning import score_all
from benchmarks.planning_bundled import budget_for, experts_at, load_bundled
from benchmarks.planning_report import ACCURACY_DIR, run_and_report
from benchmarks.planning_report import parser as planning_parser

SHARES = (0.25, 0.5, 0.75, 0.875)


def run(args) -> dict:
    b = load_bundled()
    accuracy = profiles.load_accuracy(ACCURACY_DIR)
    error = accuracy.held_out_error[MIX]
    verifier = Verifier(LM_DIR, ProfilingSet(**accuracy.profiling_set), accuracy.fingerprint)
    rows = []
    try:
        for share in tqdm(SHARES[:2] if args.quick else SHARES, desc="verifying", unit="budget"):
            budget = budget_for(b.memory, experts_at(share, b.capacity))
            start = time.perf_counter()
            ranked = candidates(b.mix, budget, b.service, SearchSettings(), count=args.candidates)
            searched = time.perf_counter() - start
            before = verifier.seconds
            start = time.perf_counter()
            chosen = verify(ranked, error, lambda f: verifier.accuracy(configuration(f, b.mix.num_experts), MIX))
            rows.append(dict(share=share, budget_bytes=budget, search_seconds=searched,
                             verify_seconds=time.perf_counter() - start, scoring_seconds=verifier.seconds - before,
                             candidates=[f.to_json() for f in ranked], first=ranked[0].to_json(),
                             chosen=chosen.to_json(), note=chosen.verified))
    finally:
        verifier.close()
    judging = ProfilingSet("lm", texts=args.texts, tokens=args.tokens, purpose="judging")
    plans = {}
    for row in rows:
        for role in ("first", "chosen"):
            found = row[role]
            plans[(row["share"], role)] = configuration_of(found)
    scores = score_all(list(plans.values()), judging)
    for row in rows:
        for role in ("first", "chosen"):
            row[f"{role}_judging"] = scores[plans[(row["share"], role)].key]["accuracy"][MIX]
    return dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs", error=error, candidates=args.candidates,
                profiling_set=accuracy.profiling_set, judging=dict(texts=args.texts, tokens=args.tokens), rows=rows)


def configuration_of(body: dict):
    from swapmoe.profiler.configs import Configuration

    return Configuration(tuple(body["experts_per_layer"]), body["update_frequency"])


def report(results: dict, command: str) -> list[str]:
    lines = ["# Measured before pushed: verifying near-tied plans", "",
             f"Reproduce: `{command}` ({results['machine']}; {results['minutes']:.1f} min). The bundled LM, one "
             f"stream, its stored profiles; E_accuracy's held-out mean relative error on the mix is "
             f"{results['error']:.1%}: the search's best {results['candidates']} plans predicted within it of the "
             f"first are scored on the profiling set ({results['profiling_set']['texts']} texts x "
             f"{results['profiling_set']['tokens']} tokens per domain) and the best measured kept. Judged on the "
             f"judging half ({results['judging']['texts']} x {results['judging']['tokens']}), which neither saw.", "",
             "| experts kept | near ties measured | verification s (scoring) | search s | search's first: judging "
             "perplexity | verified pick: judging perplexity | verified better by |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ties = r["note"].split("best of ")[1].split(" ")[0] if r["note"].startswith("measured") else "0"
        same = r["chosen"]["experts_per_layer"] == r["first"]["experts_per_layer"] and \
            r["chosen"]["update_frequency"] == r["first"]["update_frequency"]
        gain = (r["first_judging"] - r["chosen_judging"]) / r["first_judging"]
        lines.append(f"| {r['share']:.0%} | {ties} | {r['verify_seconds']:.1f} ({r['scoring_seconds']:.1f}) | "
                     f"{r['search_seconds']:.1f} | {r['first_judging']:.3f} | {r['chosen_judging']:.3f}"
                     f"{' (the same plan)' if same else ''} | {'-' if same else f'{gain:+.2%}'} |")
    lines += ["", "Notes per budget: " + "; ".join(f"{r['share']:.0%}: {r['note']}" for r in results["rows"])]
    return lines


def main(argv=None) -> None:
    parser = planning_parser(__doc__, texts=6)
    parser.add_argument("--candidates", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.tokens = 1, 64
    run_and_report("planning-verify", args, run, report)


if __name__ == "__main__":
    main()
