"""Precision as a plan dimension against llama.cpp at its own memory, side by side in one run.

    python -m benchmarks.precision                 # writes benchmarks/results/RESULTS-precision.{md,json}
    python -m benchmarks.precision --rounds 1 --tokens 32   # a smoke run

The model is issue 30's: a random Mixtral of 1.8 GiB (8 layers x 8 experts, hidden 1024,
experts' intermediate 2304). Each row decodes the same sampled tokens (temperature 1, fixed
seed: a random model's greedy decoding loops on one token, sampling spreads the routing) in a
fresh process, timed after a warm-up generation (``--warmup`` tokens) in the same process (both
systems, as llama-bench warms up), rows alternating round by round so drift on a shared machine
hits them alike: llama.cpp (``benchmarks.peer_llamacpp``) on GGUF conversions of the same
checkpoint, and the executor's engine (its serving loop, in-process: no gRPC) started with
``--precision`` (and ``--dense-precision int4`` in the "int4 dense" rows) under a budget: its
starting plan keeps as many experts as the budget holds at that precision. "Capped" rows run in
a cgroup memory cap that charges every page the process touches, the mapped model file included.
Quality comes from the bundled LM (random weights have none): held-out perplexity with every
expert at each precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import cgroup_cap, peer_llamacpp

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-precision.md"
GiB = 1 << 30
PROMPT = tuple(range(3, 19))


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    system: str  # "llama.cpp" or "executor"
    outtype: str = ""  # llama.cpp's GGUF type
    precision: str = ""  # the executor's experts ("": the checkpoint's)
    dense_precision: str = ""  # the executor's other weights (``--dense-precision``)
    budget_gib: float = 0.0
    cap_gib: float = 0.0  # 0: no cgroup cap


ROWS = (
    Row("llama.cpp f16", "llama.cpp", outtype="f16"),
    Row("llama.cpp q4_0", "llama.cpp", outtype="q4_0"),
    Row("executor int4, every expert, 1 GiB budget", "executor", precision="int4", budget_gib=1.0),
    Row("executor int4, int4 dense, every expert, 1 GiB budget", "executor", precision="int4",
        dense_precision="int4", budget_gib=1.0),
    Row("executor int8, every expert, 1 GiB budget", "executor", precision="int8", budget_gib=1.0),
    Row("llama.cpp f32, 1 GiB cap", "llama.cpp", outtype="f32", cap_gib=1.0),
    Row("llama.cpp f16, 1 GiB cap", "llama.cpp", outtype="f16", cap_gib=1.0),
    Row("executor int4, every expert, 1 GiB cap", "executor", precision="int4", budget_gib=0.6, cap_gib=1.0),
    Row("executor int4, int4 dense, every expert, 1 GiB cap", "executor", precision="int4",
        dense_precision="int4", budget_gib=0.6, cap_gib=1.0),
    Row("executor float32, what 0.6 GiB holds, 1 GiB cap", "executor", budget_gib=0.6, cap_gib=1.0),
)


def issue_mixtral(directory: Path) -> Path:
    """Issue 30's 1.8 GiB Mixtral, random weights, saved once."""
    from swapmoe.models.tiny import save_tiny_model

    if (directory / "config.json").exists():
        return directory
    return save_tiny_model("mixtral", directory, hidden_size=1024, intermediate_size=2304, num_hidden_layers=8,
                           num_local_experts=8, num_attention_heads=16, num_key_value_heads=4)


def child() -> None:
    """The executor's side of a row, in its own process: joins the cap, serves, prints one JSON line."""
    spec = json.loads(sys.argv[1])
    cgroup_cap.join(spec["cgroup"])
    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.executor.memory import process_peak_rss, process_rss
    from swapmoe.executor.requests import GenerationRequest, SamplingParams

    library_rss = process_rss()
    config = EngineConfig(Path(spec["checkpoint"]), budget_bytes=int(spec["budget_gib"] * GiB), node_id="bench",
                          threads=spec["threads"], store_root=Path(spec["store_root"]), precision=spec["precision"],
                          dense_precision=spec["dense_precision"])
    with Engine(config) as engine:
        experts = engine.achieved
        if spec["warmup"]:  # as the peer's: a served model has decoded before
            warmup = GenerationRequest(PROMPT, spec["warmup"], SamplingParams(temperature=1.0, seed=spec["seed"] + 1))
            for _ in engine.generate(warmup):
                pass
        request = GenerationRequest(PROMPT, spec["tokens"], SamplingParams(temperature=1.0, seed=spec["seed"]))
        times, count = [time.perf_counter_ns()], 0
        for chunk in engine.generate(request):
            times.append(time.perf_counter_ns())
            count += len(chunk.token_ids)
        memory = engine.memory()
    print(json.dumps(dict(tokens=count, decode_tokens_per_second=(count - 1) / ((times[-1] - times[1]) / 1e9),
                          ttft_ms=(times[1] - times[0]) / 1e6, peak_rss=process_peak_rss(), library_rss=library_rss,
                          accounted=memory.accounted_bytes, experts=list(experts))))


def run_executor(row: Row, checkpoint: Path, store_root: Path, args) -> dict:
    group = None
    try:
        if row.cap_gib:
            group = cgroup_cap.make(int(row.cap_gib * GiB))
        spec = dict(cgroup=str(group or ""), checkpoint=str(checkpoint), store_root=str(store_root),
                    budget_gib=row.budget_gib, precision=row.precision, dense_precision=row.dense_precision,
                    threads=args.threads, tokens=args.tokens, seed=args.seed, warmup=args.warmup)
        done = subprocess.run([sys.executable, "-c", "from benchmarks.precision import child; child()",
                               json.dumps(spec)], capture_output=True, text=True, cwd=HERE.parent)
        if done.returncode:
            return dict(error=f"status {done.returncode}: {done.stderr[-1500:]}", decode_tokens_per_second=0.0)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if group:
            out["cgroup_peak"] = int((group / "memory.max_usage_in_bytes").read_text())
        return out
    finally:
        if group:
            cgroup_cap.remove(group)


def run_row(row: Row, checkpoint: Path, store_root: Path, ggufs: dict, args) -> dict:
    if row.system == "executor":
        return run_executor(row, checkpoint, store_root, args)
    return peer_llamacpp.decode(ggufs[row.outtype], list(PROMPT), args.tokens, args.threads, sample=True,
                                seed=args.seed, warmup=args.warmup,
                                cap_bytes=int(row.cap_gib * GiB) if row.cap_gib else None)


def bundled_quality() -> list[dict]:
    """Held-out perplexity of the bundled LM with every expert resident at each precision, with the
    dense weights at the checkpoint's precision and at int4."""
    import math

    import torch

    from benchmarks.runtime import BUNDLED_LM
    from swapmoe.executor.virtual_experts import VirtualExperts
    from transformers import AutoTokenizer

    from swapmoe.models.corpus import load_eval

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_LM)
    texts = [tokenizer(d["text"], add_special_tokens=False)["input_ids"][:256]
             for domain in ("code", "prose", "manual") for d in load_eval(domain)[:20]]
    rows = []
    for dense in ("", "int4"):
        runtime = VirtualExperts(BUNDLED_LM, store_root=HERE.parent / ".bench-stores", log=lambda _: None,
                                 dense_precision=dense)
        try:
            everything = [l.num_experts for l in runtime.layout.layers]
            for precision in ("", *runtime.layout.precisions) if not dense else ("", "int4"):
                runtime.resize(everything, [precision] * len(everything))
                nll, count = 0.0, 0
                with torch.no_grad():
                    for ids in texts:
                        logits = runtime.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                        nll -= torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
                        count += len(ids) - 1
                rows.append(dict(precision=precision or runtime.layout.dtype, dense=dense or runtime.layout.dtype,
                                 perplexity=math.exp(nll / count), dense_bytes=runtime.layout.dense_bytes,
                                 bytes_per_expert=runtime.layout.layers[0].bytes_at(precision)))
        finally:
            runtime.close()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs of every row, alternating (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="sampled tokens per run (default 64)")
    p.add_argument("--threads", type=int, default=2, help="threads for both systems (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=16,
                   help="tokens each process generates before the timed run, for both systems (default 16)")
    p.add_argument("--work", type=Path, default=HERE.parent / ".bench-stores" / "precision",
                   help="where the checkpoint, its store and its GGUFs are kept")
    p.add_argument("--report", type=Path, default=REPORT)
    args = p.parse_args(argv)
    if note := peer_llamacpp.available():
        raise SystemExit(f"llama.cpp is the peer this benchmark compares with: {note}")
    from swapmoe.executor.store_build import ensure_store

    checkpoint = issue_mixtral(args.work / "mixtral-1.8g")
    store_root = args.work / "stores"
    ensure_store(checkpoint, store_root)
    ggufs = {t: peer_llamacpp.gguf_for(checkpoint, t, args.work / "gguf", threads=args.threads)
             for t in sorted({r.outtype for r in ROWS if r.outtype})}
    runs = {row.name: [] for row in ROWS}
    for round_ in range(args.rounds):
        order = ROWS[round_ % len(ROWS):] + ROWS[:round_ % len(ROWS)]
        for row in order:
            runs[row.name].append(run_row(row, checkpoint, store_root, ggufs, args))
            print(f"round {round_ + 1}/{args.rounds} {row.name}: "
                  f"{runs[row.name][-1]['decode_tokens_per_second']:.1f} tokens/s", flush=True)
    import torch

    torch.set_num_threads(args.threads)
    quality = bundled_quality()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"{args.threads} threads for both systems, {args.tokens} sampled tokens per run after a warm-up "
               f"generation of {args.warmup}")
    results = dict(machine=machine, args={k: str(v) for k, v in vars(args).items()},
                   rows=[asdict(r) for r in ROWS], runs=runs, quality=quality,
                   gguf_bytes={t: g.stat().st_size for t, g in ggufs.items()})
    args.report.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = render(results)
    args.report.write_text(text)
    print(text)


def _median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r and not r.get("error")]
    return statistics.median(values) if values else float("nan")


def _mib(nbytes: float) -> str:
    return "-" if nbytes != nbytes else f"{nbytes / 2**20:.0f}"  # NaN: not measured for this row


def render(results: dict) -> str:
    rows, runs = [Row(**r) for r in results["rows"]], results["runs"]
    speed = {r.name: _median(runs[r.name], "decode_tokens_per_second") for r in rows}
    lines = ["# Precision as a plan dimension, beside llama.cpp (issue 30)", "",
             __doc__.split("\n\n", 2)[2].strip(), "", results["machine"], "",
             "| row | tokens/s (median) | runs | experts resident | peak RSS MiB | cgroup peak MiB | accounted MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rs = runs[r.name]
        each = ", ".join("killed" if x.get("error") else f"{x['decode_tokens_per_second']:.1f}" for x in rs)
        resident = next((sum(x["experts"]) for x in rs if "experts" in x), None)
        resident = f"{resident} of 64" if resident is not None else "64 (mapped)"
        mib = [_mib(_median(rs, key)) for key in ("peak_rss", "cgroup_peak", "accounted")]
        lines.append(f"| {r.name} | {speed[r.name]:.1f} | {each} | {resident} | {' | '.join(mib)} |")
    lines += ["", "GGUF sizes: " + ", ".join(f"{t} {b / 2**20:.0f} MiB" for t, b in results["gguf_bytes"].items()),
              "", "## Against the goals", ""]
    ratio = speed["executor int4, every expert, 1 GiB budget"] / speed["llama.cpp f16"]
    dense_too = speed["executor int4, int4 dense, every expert, 1 GiB budget"] / speed["llama.cpp f16"]
    capped = max(speed[f"executor int4, {dense}every expert, 1 GiB cap"]
                 for dense in ("", "int4 dense, ")) / speed["llama.cpp f32, 1 GiB cap"]
    rounds = [a["decode_tokens_per_second"] / b["decode_tokens_per_second"] for a, b in
              zip(runs["executor int4, int4 dense, every expert, 1 GiB budget"], runs["llama.cpp f16"])
              if not a.get("error") and b.get("decode_tokens_per_second")]
    lines += [f"- Every expert at int4 within a 1 GiB budget: {ratio:.2f}x llama.cpp f16's tokens/s (goal: at least "
              f"1x); with the dense weights at int4 too: {dense_too:.2f}x (round by round: "
              f"{', '.join(f'{r:.2f}' for r in rounds)}).",
              f"- Under a 1 GiB cap: {capped:.1f}x llama.cpp f32's tokens/s (goal: at least 5x).",
              "", "## Quality: the bundled LM, every expert resident, held-out perplexity", "",
              "| experts | dense weights | bytes per expert | dense MiB | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {q['precision']} | {q.get('dense', '-')} | {q['bytes_per_expert']} | "
              f"{_mib(q.get('dense_bytes', float('nan')))} | {q['perplexity']:.2f} |" for q in results["quality"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
