"""The profiler on the bundled LM: accuracy profiling on Ray, E_accuracy, E_latency, the sweep.

    python -m benchmarks.profiling                       # writes benchmarks/results/RESULTS-profiling.{md,json}
    python -m benchmarks.profiling --configurations 40   # a shorter accuracy profile

1. Accuracy profiling of ``models/swapmoe-lm`` (profiling set: 3 texts x 256 tokens per domain)
   with 2 Ray workers into ``--root`` (resumable: a rerun scores only what is missing).
2. Speed-up: the same ``--speedup-configurations`` scored by one process and by 2 Ray workers,
   side by side in this run (one torch thread per worker and in the single process).
3. E_accuracy (MLP) against a linear model on held-out configurations, per workload.
4. The device profile of this machine through a real ``Engine`` (``Engine.profile``: the
   update-frequency sweep and its inflection point), E_latency fitted on it, and E_latency
   against tokens/s measured on configurations the fit never saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from swapmoe.core.budget import MemoryModel
from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest
from swapmoe.executor.device_profiling import ProfileSpec
from swapmoe.models.bundled import LM_DIR
from swapmoe.profiler import artifacts
from swapmoe.profiler.accuracy import AccuracyProfiler, AccuracyRun, start_ray
from swapmoe.profiler.configs import Configuration, sample_many
from swapmoe.profiler.performance_models import e_memory, relative_error
from swapmoe.profiler.report import finish_accuracy, save_device
from swapmoe.profiler.scoring import Scorer
from swapmoe.profiler.workloads import ProfilingSet

HERE = Path(__file__).resolve().parent
SET = ProfilingSet("lm", texts=3, tokens=256)
LATENCY_CONFIGS = [((10,) * 6, 4), ((12, 4, 12, 4, 12, 4), 8), ((16, 16, 2, 2, 16, 16), 2),
                   ((4,) * 6, 16), ((6, 10, 6, 10, 6, 10), 1), ((14, 14, 14, 3, 3, 3), 32)]
ROUNDS = 5  # generations of 64 tokens per configuration when checking E_latency


def accuracy_profile(root: Path, configurations: int) -> dict:
    profiler = AccuracyProfiler(AccuracyRun(LM_DIR, SET, configurations=configurations, seed=0, workers=2, root=root))
    before = len(artifacts.read_scores(profiler.scores_path))
    start = time.perf_counter()
    rows = profiler()
    wall = time.perf_counter() - start
    fitted = finish_accuracy(profiler.directory, profiler.fingerprint)
    return dict(directory=str(profiler.directory.relative_to(HERE.parent) if profiler.directory.is_relative_to(HERE.parent)
                              else profiler.directory),
                configurations=len(rows), scored_now=len(rows) - before, wall_seconds=round(wall, 1),
                scoring_span_seconds=round(max(r["finished"] for r in rows)
                                           - min(r["finished"] - r["seconds"] for r in rows), 1),
                worker_seconds=round(sum(r["seconds"] for r in rows), 1),
                reference=fitted["reference_accuracy"],
                errors={w: f["held_out_error"] for w, f in fitted["workloads"].items()},
                trained_on={w: f["trained_on"] for w, f in fitted["workloads"].items()})


def speedup(count: int) -> dict:
    """One process against 2 Ray workers on the same configurations, each from a cold start."""
    keys = [c.key for c in sample_many([16] * 6, count, seed=99)]
    start = time.perf_counter()
    scorer = Scorer(LM_DIR, SET)
    scores = {k: scorer.score(Configuration.from_key(k)) for k in keys}
    scorer.close()
    one = time.perf_counter() - start
    single = {k: s.totals for k, s in scores.items()}
    with tempfile.TemporaryDirectory() as root:
        profiler = AccuracyProfiler(AccuracyRun(LM_DIR, SET, configurations=count, seed=99, workers=2, root=Path(root)))
        profiler.configurations = lambda num_experts: [Configuration.from_key(k) for k in keys]
        start = time.perf_counter()
        rows = profiler(progress=False)
        two = time.perf_counter() - start
    same = all(single[r["key"]] == r["totals"] for r in rows)
    scoring_one = sum(s.seconds for s in scores.values())  # without start-up: the scoring alone
    scoring_two = max(r["finished"] for r in rows) - min(r["finished"] - r["seconds"] for r in rows)
    return dict(configurations=count, one_process_seconds=round(one, 1), ray_2_workers_seconds=round(two, 1),
                speedup=round(one / two, 2), identical_scores=same,
                scoring_one_seconds=round(scoring_one, 1), scoring_two_seconds=round(scoring_two, 1),
                scoring_speedup=round(scoring_one / scoring_two, 2),
                median_config_seconds_one=round(statistics.median(s.seconds for s in scores.values()), 2),
                median_config_seconds_ray=round(statistics.median(r["seconds"] for r in rows), 2))


def device_and_latency(root: Path, budget: int) -> dict:
    with Engine(EngineConfig(LM_DIR, budget, node_id="bench")) as engine:
        engine.apply_plan(Configuration((8,) * 6, 4).plan(engine.plan.version + 1))
        profile = None
        for progress in engine.profile(ProfileSpec(repeats=5, sweep_tokens=64)):
            profile = progress.result or profile
        directory = save_device(root, profile)
        from swapmoe.profiler.report import load_latency_model

        latency = load_latency_model(directory, profile.model_fingerprint)
        memory = MemoryModel(engine.layout, engine.memory_model.reserve)
        reference = Configuration(profile.sweep_experts_per_layer, 0)  # the sweep's baseline, measured again
        configs = [reference] + [Configuration(kept, frequency) for kept, frequency in LATENCY_CONFIGS]
        rates = {c.key: [] for c in configs}
        accounted = {}
        version = engine.plan.version
        for _ in range(ROUNDS):  # configurations interleaved, so drift on the machine hits them alike
            for config in configs:
                version += 1
                assert engine.apply_plan(config.plan(version)).accepted
                accounted[config.key] = engine.memory().accounted_bytes
                _measured_tokens_per_second(engine)  # untimed: the loads a new plan starts settle
                rates[config.key].append(_measured_tokens_per_second(engine))
        # How much faster or slower the machine runs now than during the profile (a shared machine drifts).
        drift = statistics.median(rates[reference.key]) / latency.tokens_per_second(reference)
        checks = []
        for config in configs[1:]:
            measured, predicted = statistics.median(rates[config.key]), latency.tokens_per_second(config)
            checks.append(dict(config=config.key, predicted_tps=round(predicted, 1), measured_tps=round(measured, 1),
                               error=round(relative_error(predicted, measured), 4),
                               error_drift_corrected=round(relative_error(predicted * drift, measured), 4),
                               e_memory=e_memory(memory, config), accounted=accounted[config.key]))
        summary = (directory / "summary.md").read_text()
    return dict(profile_summary=summary, directory=str(directory.relative_to(HERE.parent)),
                inflection=profile.inflection_update_frequency,
                sweep=[dict(update_frequency=p.update_frequency, inter_token_ms=round(p.inter_token_ns / 1e6, 3),
                            tokens_per_second=round(p.tokens_per_second, 1), loads_per_token=round(p.loads_per_token, 3))
                       for p in profile.sweep],
                drift=round(drift, 4), compute_ms=round(latency.compute_ns / 1e6, 3), base_ms=round(latency.base_ns / 1e6, 3),
                latency_checks=checks)


def _measured_tokens_per_second(engine, tokens: int = 64) -> float:
    """Decode tokens per second of one generation as its client sees them (first token to last)."""
    request = GenerationRequest(tuple(range(10, 42)), max_new_tokens=tokens)
    stamps = [time.perf_counter() for chunk in engine.generate(request) for _ in chunk.token_ids]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def write_report(results: dict, out: Path) -> None:
    a, s, d = results["accuracy"], results["speedup"], results["device"]
    carried = f" The {' and '.join(results['carried'])} section(s) come from the previous run." if results.get("carried") else ""
    lines = ["# Profiler benchmark", "", f"Reproduce: `{results['command']}` ({results['machine']}).{carried}", "",
             "## Accuracy profiling of the bundled LM", "",
             f"{a['configurations']} configurations (the full model and random ones, `swapmoe.profiler.configs`) "
             f"on the profiling set `{SET.name}`, 2 Ray workers: {a['worker_seconds'] / 60:.1f} worker-minutes, "
             f"{a['scoring_span_seconds'] / 60:.1f} min of wall time from the first result to the last "
             f"(`{a['directory']}/scores.jsonl`; this invocation scored {a['scored_now']} of them in "
             f"{a['wall_seconds'] / 60:.1f} min, the rest were there already). The paper: about 20 minutes once "
             f"per model on its device.", "",
             "Full-model perplexity on the profiling set: " +
             ", ".join(f"{w} {v:.2f}" for w, v in a["reference"].items()) + ".", "",
             "## Ray speed-up (same configurations, one run)", "",
             "| configurations | | one process | Ray, 2 workers | speed-up | identical scores |", "|---|---|---|---|---|---|",
             f"| {s['configurations']} | from a cold start (model load included) | {s['one_process_seconds']} s | "
             f"{s['ray_2_workers_seconds']} s | **{s['speedup']}x** | {s['identical_scores']} |",
             f"| | scoring only (first score started to last finished) | {s['scoring_one_seconds']} s | "
             f"{s['scoring_two_seconds']} s | **{s['scoring_speedup']}x** | |", "",
             f"One torch thread per worker and in the single process. A configuration takes "
             f"{s['median_config_seconds_one']} s (median) in the single process and "
             f"{s['median_config_seconds_ray']} s in a Ray worker while the other worker runs: two processes on this "
             f"machine's two cores slow each other down, which bounds the speed-up below 2x.", "",
             "## E_accuracy on held-out configurations", "",
             "| workload | fit on | E_accuracy (MLP) mean rel. error | max | rank corr. | linear mean rel. error | rank corr. |",
             "|---|---|---|---|---|---|---|"]
    for w, e in a["errors"].items():
        lines.append(f"| {w} | {a['trained_on'][w]} | {e['mlp']['mean_relative_error']:.2%} | "
                     f"{e['mlp']['max_relative_error']:.1%} | {e['mlp']['spearman']:.3f} | "
                     f"{e['linear']['mean_relative_error']:.2%} | {e['linear']['spearman']:.3f} |")
    lines += ["", "## Device profile of this machine and E_latency", "",
              f"Stored in `{d.get('directory', '')}`; plots of both profiles: `benchmarks/results/plots/`.", "",
              d["profile_summary"].replace("# Device profile", "### Device profile"),
              "E_latency against measured decode tokens/s on configurations the fit never saw "
              f"(median of {ROUNDS} generations of 64 tokens each, configurations interleaved). The sweep's own "
              f"baseline, measured again among them, ran at {d['drift']:.3f}x the speed it had during the profile; "
              "the last error column scales the predictions by that drift:", "",
              "| configuration | predicted tokens/s | measured | error | error, drift-corrected | E_memory = accounted |",
              "|---|---|---|---|---|---|"]
    lines += [f"| `{c['config']}` | {c['predicted_tps']} | {c['measured_tps']} | {c['error']:.1%} | "
              f"{c['error_drift_corrected']:.1%} | {c['e_memory'] == c['accounted']} |" for c in d["latency_checks"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configurations", type=int, default=240)
    parser.add_argument("--speedup-configurations", type=int, default=16)
    parser.add_argument("--root", type=Path, default=HERE.parent / "models" / "profiles")
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "speedup", "device"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start_ray(cpus=2)
    import platform

    argv = sys.argv[1:] if argv is None else argv
    results = dict(command=" ".join(["python -m benchmarks.profiling", *argv]),
                   machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) per scorer")
    out = HERE / "results" / "RESULTS-profiling"
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    results["carried"] = sorted(set(args.skip) | set(previous.get("carried", [])) & set(args.skip))
    if args.skip:
        results["command"] = previous.get("command", results["command"])
    for name, fn in (("accuracy", lambda: accuracy_profile(args.root, args.configurations)),
                     ("speedup", lambda: speedup(args.speedup_configurations)),
                     ("device", lambda: device_and_latency(args.root, 256 << 20))):
        results[name] = previous.get(name) if name in args.skip else fn()
        print(json.dumps({name: results[name]}, indent=1)[:3000])
    write_report(results, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
