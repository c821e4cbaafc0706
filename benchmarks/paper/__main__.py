"""``python -m benchmarks.paper [--quick] [--out DIR] [--sections a,b]``: measure, then write
``RESULTS-paper.md``, ``results.json`` and ``figures/`` under DIR (``--render``: only render
DIR/results.json again)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.paper import report
from benchmarks.paper.context import OUT, ROOT, Context

QUICK_OUT = ROOT / ".bench-stores" / "paper-quick"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer budgets, texts and tokens: minutes, not an hour")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where the report goes (default {OUT}; with --quick, {QUICK_OUT}, so a quick run "
                             "never replaces the committed report)")
    parser.add_argument("--sections", default=",".join(report.SECTIONS),
                        help=f"comma-separated, of {','.join(report.SECTIONS)} (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the other core is left to expert loads)")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: render the report again from DIR/results.json")
    args = parser.parse_args(argv)
    args.out = args.out or (QUICK_OUT if args.quick else OUT)
    if args.render:
        if not (args.out / "results.json").exists():
            parser.error(f"no results to render: {args.out / 'results.json'} does not exist")
        return _write(json.loads((args.out / "results.json").read_text()), args.out, echo=False)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(report.SECTIONS)):
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(report.SECTIONS)}")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ctx = Context(quick=args.quick, threads=args.threads)
    run = dict(quick=args.quick, threads=args.threads, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
               torch=torch.__version__, git=_git(), started=datetime.datetime.now().isoformat(timespec="seconds"),
               seconds_per_section={}, measured_at={})
    results = dict(run=run, sections={})
    earlier = args.out / "results.json"
    if set(names) != set(report.SECTIONS) and earlier.exists():  # a partial run replaces only its sections
        kept = json.loads(earlier.read_text())
        if kept["run"]["quick"] == args.quick:
            results["sections"] = kept["sections"]
            for key in ("seconds_per_section", "measured_at"):
                run[key] = {n: v for n, v in kept["run"].get(key, {}).items() if n not in names}
            run["measured_at"] = {n: run["measured_at"].get(n, kept["run"]["git"]) for n in kept["sections"]
                                  if n not in names}
    for name in names:
        print(f"[paper] {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        results["sections"][name] = report.section(name).measure(ctx)
        run["seconds_per_section"][name] = round(time.monotonic() - began, 1)
        run["measured_at"][name] = run["git"]
        print(f"[paper] {name} done in {run['seconds_per_section'][name]:.0f} s", file=sys.stderr, flush=True)
    results["sections"] = {n: results["sections"][n] for n in report.SECTIONS if n in results["sections"]}
    run["seconds"] = round(sum(run["seconds_per_section"].values()), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return _write(results, args.out)


def _write(results: dict, out: Path, echo: bool = True) -> int:
    text, figures = report.render(results, out)
    (out / "RESULTS-paper.md").write_text(text)
    if echo:
        print(text)
    print(f"wrote {out / 'RESULTS-paper.md'} and {len(figures)} figures", file=sys.stderr)
    return 0


def _git() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", "executor", "planner_service", "profiler", "core", "benchmarks")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" (uncommitted changes)" if dirty else "")


if __name__ == "__main__":
    raise SystemExit(main())
