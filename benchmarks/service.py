"""Concurrent clients on the bundled model: continuous batching against one generation at a
time, and what gRPC streaming costs, with 1, 4 and 16 concurrent clients.

    python -m benchmarks.service            # writes benchmarks/results/RESULTS-service.md

Three paths run the same generations (greedy, 48 new tokens each), alternating round by round
so drift on a shared machine hits them alike: the engine in-process one generation at a time
(``max_batch=1``: the executor before continuous batching), the engine in-process batching up
to 16, and an executor process (``--max-batch 16``) over gRPC on loopback.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.requests import GenerationRequest
from swapmoe.models.corpus import DOMAINS, load_eval
from swapmoe.orchestration.processes import spawn
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-service.md"
MODEL = HERE.parent / "models" / "swapmoe-lm"
BUDGET = 1 << 30


BATCH = 16
PATHS = ("one at a time", "batched", "gRPC, batched")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_clients(generate, prompts: list[str], server: psutil.Process | None = None
                ) -> tuple[float, list[float], list[float], int, float]:
    """All prompts at once, one thread each: (wall seconds, TTFT per request, gaps between a
    request's tokens, tokens, CPU seconds of ``server``, by default this process)."""
    server = server or psutil.Process()
    ttfts, gaps, tokens = [], [], []
    start = threading.Barrier(len(prompts) + 1)

    def client(prompt):
        start.wait()
        began = time.perf_counter()
        first, count, last = None, 0, None
        for n in generate(prompt):
            now = time.perf_counter()
            first = first or now
            if last is not None and n:
                gaps.append(now - last)
            last = now if n else last
            count += n
        ttfts.append(first - began)
        tokens.append(count)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    start.wait()
    began, cpu = time.perf_counter(), cpu_seconds(server)
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, ttfts, gaps, sum(tokens), cpu_seconds(server) - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    texts = [r["text"] for d in DOMAINS for r in load_eval(d)[:8]]
    solo = Engine(EngineConfig(MODEL, BUDGET, max_queue=64, max_batch=1))
    batched = Engine(EngineConfig(MODEL, BUDGET, max_queue=64, max_batch=BATCH))
    prompts = [solo.text.decode(list(solo.tokenize(t)[:32])) for t in texts]
    server = spawn("executor", ["executor", "serve", "--model", str(MODEL), "--budget", str(BUDGET), "--port", "0",
                                "--max-batch", str(BATCH)])
    channel = transport.channel(server.address)
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)

    def in_process(engine):
        def generate(prompt):
            request = GenerationRequest(engine.tokenize(prompt), args.new_tokens)
            for chunk in engine.generate(request):
                yield len(chunk.token_ids)
        return generate

    def over_grpc(prompt):
        for chunk in stub.Generate(epb.GenerateRequest(text=prompt, max_new_tokens=args.new_tokens), timeout=600):
            yield len(chunk.token_ids)

    results = {}
    try:
        paths = dict(zip(PATHS, (in_process(solo), in_process(batched), over_grpc)))
        processes = {PATHS[2]: psutil.Process(server.process.pid)}  # in-process: this one
        for path in paths.values():  # warm-up
            run_clients(path, prompts[:2])
        for clients in args.clients:
            for round_ in tqdm(range(args.rounds), desc=f"{clients} clients", unit="round"):
                batch = [prompts[(round_ * clients + i) % len(prompts)] for i in range(clients)]
                for name, path in paths.items():
                    seconds, ttfts, gaps, tokens, cpu = run_clients(path, batch, processes.get(name))
                    entry = results.setdefault((clients, name), dict(seconds=0.0, tokens=0, ttfts=[], gaps=[], cpu=0.0))
                    entry["seconds"] += seconds
                    entry["cpu"] += cpu
                    entry["tokens"] += tokens
                    entry["ttfts"] += ttfts
                    entry["gaps"] += gaps
    finally:
        channel.close()
        server.stop()
        solo.close()
        batched.close()
    report = render(results, args)
    print(report)
    args.report.write_text(report)
    print(f"wrote {args.report}")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 if ordered else float("nan")


def render(results: dict, args) -> str:
    lines = [
        "# Service benchmark: continuous batching, and streaming over gRPC against in-process generation",
        "",
        f"`python -m benchmarks.service` on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"model `models/swapmoe-lm` (every expert resident); {args.rounds} rounds x clients, "
        f"{args.new_tokens} new tokens per request, greedy, the three paths alternating within each round. "
        f"\"one at a time\": the engine in-process with `max_batch=1` (the executor before continuous batching); "
        f"\"batched\": in-process with `max_batch={BATCH}`; \"gRPC, batched\": an executor process "
        f"(`--max-batch {BATCH}`) on loopback. Inter-token latency: the gaps between a request's streamed tokens. "
        f"Server CPU: CPU seconds per wall second of the process that generates (in-process: the benchmark's own, "
        f"clients included; gRPC: the executor's), out of {os.cpu_count()}.",
        "",
        "| clients | path | tokens/s (aggregate) | vs one at a time | TTFT p50 / p99 ms | inter-token p50 / p99 ms "
        "| server CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    rate = {key: r["tokens"] / r["seconds"] for key, r in results.items()}
    for clients in args.clients:
        for name in PATHS:
            r = results[(clients, name)]
            lines.append(f"| {clients} | {name} | {rate[(clients, name)]:.1f} | "
                         f"{rate[(clients, name)] / rate[(clients, PATHS[0])]:.2f}x | "
                         f"{_pct(r['ttfts'], 0.5):.1f} / {_pct(r['ttfts'], 0.99):.1f} | "
                         f"{_pct(r['gaps'], 0.5):.1f} / {_pct(r['gaps'], 0.99):.1f} | "
                         f"{r['cpu'] / r['seconds']:.2f} |")
    most, grpc_path = max(args.clients), PATHS[2]
    scale = rate[(most, grpc_path)] / rate[(1, grpc_path)]
    overhead = rate[(1, grpc_path)] / rate[(1, PATHS[1])]
    lines += ["", "Goals (issue 16):", "",
              f"- {most} clients over gRPC at >= 5x one client's tokens/s: **{scale:.2f}x** "
              f"({'met' if scale >= 5 else 'not met'}).",
              f"- gRPC at >= 0.95x in-process tokens/s at one client: **{overhead:.3f}x** "
              f"({'met' if overhead >= 0.95 else 'not met'}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
