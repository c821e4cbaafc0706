"""The code at a git ref against the working tree, side by side in one run: the service
benchmark's in-process serving (1, 4 and 16 concurrent clients on the bundled LM, continuous
batching up to 16) and the runtime benchmark's single-stream generation (virtual experts at 50%,
an update every 4 tokens), each in a fresh process per side, the sides alternating round by round
so drift on a shared machine hits both alike.

    python -m benchmarks.before_after --before REF        # writes benchmarks/results/RESULTS-before-after.md

Each side is installed from its own snapshot (``git archive`` of the ref; the working tree's files
as they are, committed or not) into a folder of its own and run from its own source tree, so
each runs its own benchmarks' code too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPORT = HERE / "results" / "RESULTS-before-after.md"
CLIENTS = (1, 4, 16)

# Run inside a side's source tree with its own package first on the path: prints one JSON line.
WORKER = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
from benchmarks import service, runtime
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.models.corpus import DOMAINS, load_eval
try:
    from swapmoe.executor.requests import GenerationRequest
except ImportError:
    from swapmoe.executor.generation import GenerationRequest
new_tokens, clients = int(sys.argv[1]), [int(c) for c in sys.argv[2].split(",")]
texts = [r["text"] for d in DOMAINS for r in load_eval(d)[:8]]
out = {}
with tempfile.TemporaryDirectory() as store:
    with Engine(EngineConfig(service.MODEL, service.BUDGET, max_queue=64, max_batch=service.BATCH, store_root=Path(store))) as engine:
        prompts = [engine.text.decode(list(engine.tokenize(t)[:32])) for t in texts]
        def generate(prompt):
            for chunk in engine.generate(GenerationRequest(engine.tokenize(prompt), new_tokens)):
                yield len(chunk.token_ids)
        service.run_clients(generate, prompts[:2])  # warm-up
        for n in clients:
            seconds, ttfts, gaps, tokens, _ = service.run_clients(generate, prompts[:n])
            out[f"serving, {n} clients"] = dict(tokens_per_second=tokens / seconds, ttft_ms=statistics.median(ttfts) * 1e3,
                                                itl_p50_ms=statistics.median(gaps) * 1e3 if gaps else 0.0)
    subject = runtime.Subject(runtime.Config("virtual 50%", 0.5), runtime.BUNDLED_LM, Path(store))
    ids = list(range(5, 37))
    runtime.generate_timed(subject, ids[:8], 4)  # warm-up
    times = []
    for _ in range(4):
        times += [runtime.generate_timed(subject, ids, new_tokens)]
    gaps = [b - a for t in times for a, b in zip(t[1:], t[2:])]
    decode_ns = sum(t[-1] - t[1] for t in times)
    out["runtime, virtual 50%"] = dict(tokens_per_second=sum(len(t) - 2 for t in times) / (decode_ns / 1e9),
                                       ttft_ms=statistics.median(t[1] - t[0] for t in times) / 1e6,
                                       itl_p50_ms=statistics.median(gaps) / 1e6)
    subject.runtime.close()
print(json.dumps(out))
"""


def snapshot(ref: str | None, into: Path) -> tuple[Path, Path]:
    """(source tree, installed package folder) of ``ref``, or of the working tree when None."""
    source = into / "source"
    source.mkdir(parents=True)
    if ref is None:  # the files git tracks or would track, as they are now
        names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               check=True, capture_output=True).stdout
        archive = subprocess.run(["tar", "-c", "--null", "--ignore-failed-read", "-T", "-", "-C", str(ROOT)],
                                 input=names, check=True, capture_output=True, cwd=ROOT).stdout
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    package = into / "package"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(package), str(source)], check=True)
    return source, package


def run_side(source: Path, package: Path, new_tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{package}{os.pathsep}{source}")
    done = subprocess.run([sys.executable, "-c", WORKER, str(new_tokens), ",".join(map(str, CLIENTS))],
                          cwd=source, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git ref to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before],
                         check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as work:
        sides = {"before": snapshot(args.before, Path(work) / "before"), "after": snapshot(None, Path(work) / "after")}
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in tqdm(range(args.rounds), desc="rounds", unit="round"):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))  # neither side always goes first
            for side in order:
                results[side].append(run_side(*sides[side], args.new_tokens))
    report = render(results, rev, args)
    print(report)
    args.report.write_text(report)
    print(f"wrote {args.report}")


def render(results: dict[str, list[dict]], rev: str, args) -> str:
    cases = list(results["before"][0])
    lines = [
        "# Before and after, side by side",
        "",
        f"`python -m benchmarks.before_after --before {args.before}` ({rev}) on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.rounds} rounds, each side in a fresh process per round, alternating; "
        f"{args.new_tokens} new tokens per request; medians over rounds. Ratio: after / before "
        "(tokens/s: above 1 is faster; latencies: below 1 is faster).",
        "",
        "| case | before tokens/s | after tokens/s | ratio | before TTFT ms | after TTFT ms | ratio "
        "| before ITL p50 ms | after ITL p50 ms | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        cells = [case]
        for key in ("tokens_per_second", "ttft_ms", "itl_p50_ms"):
            before = statistics.median(r[case][key] for r in results["before"])
            after = statistics.median(r[case][key] for r in results["after"])
            cells += [f"{before:.1f}", f"{after:.1f}", f"{after / before:.2f}" if before else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
