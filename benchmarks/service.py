"""What gRPC streaming costs: the executor as a separate process against the same engine
called in-process, on the bundled model, with 1, 4 and 16 concurrent clients.

    python -m benchmarks.service            # writes benchmarks/RESULTS-service.md

Both sides run the same generations (greedy, 48 new tokens each), alternating round by round
so drift on a shared machine hits them alike. The executor serves one generation at a time
(first come, first served), so with more clients aggregate tokens/s stays put and time to
first token grows with the queue.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from swapmoe.executor.engine import Engine, EngineConfig
from swapmoe.executor.generation import GenerationRequest
from swapmoe.models.corpus import DOMAINS, load_eval
from swapmoe.orchestration.processes import spawn
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

HERE = Path(__file__).resolve().parent
REPORT = HERE / "RESULTS-service.md"
MODEL = HERE.parent / "models" / "swapmoe-lm"
BUDGET = 1 << 30


def run_clients(generate, prompts: list[str]) -> tuple[float, list[float], int]:
    """All prompts at once, one thread each: (wall seconds, TTFT per request, tokens)."""
    ttfts, tokens = [], []
    start = threading.Barrier(len(prompts) + 1)

    def client(prompt):
        start.wait()
        began = time.perf_counter()
        first, count = None, 0
        for n in generate(prompt):
            first = first or time.perf_counter()
            count += n
        ttfts.append(first - began)
        tokens.append(count)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, ttfts, sum(tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    texts = [r["text"] for d in DOMAINS for r in load_eval(d)[:8]]
    engine = Engine(EngineConfig(MODEL, BUDGET, max_queue=64))
    prompts = [engine.text.decode(list(engine.tokenize(t)[:32])) for t in texts]
    server = spawn("executor", ["executor", "serve", "--model", str(MODEL), "--budget", str(BUDGET), "--port", "0"])
    channel = transport.channel(server.address)
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)

    def in_process(prompt):
        request = GenerationRequest(engine.tokenize(prompt), args.new_tokens)
        for chunk in engine.generate(request):
            yield len(chunk.token_ids)

    def over_grpc(prompt):
        for chunk in stub.Generate(epb.GenerateRequest(text=prompt, max_new_tokens=args.new_tokens), timeout=600):
            yield len(chunk.token_ids)

    results = {}
    try:
        for path in (in_process, over_grpc):  # warm-up
            run_clients(path, prompts[:1])
        for clients in args.clients:
            for round_ in tqdm(range(args.rounds), desc=f"{clients} clients", unit="round"):
                batch = [prompts[(round_ * clients + i) % len(prompts)] for i in range(clients)]
                for name, path in (("in-process", in_process), ("gRPC", over_grpc)):
                    seconds, ttfts, tokens = run_clients(path, batch)
                    entry = results.setdefault((clients, name), dict(seconds=0.0, tokens=0, ttfts=[]))
                    entry["seconds"] += seconds
                    entry["tokens"] += tokens
                    entry["ttfts"] += ttfts
    finally:
        channel.close()
        server.stop()
    report = render(results, args)
    print(report)
    args.report.write_text(report)
    print(f"wrote {args.report}")


def render(results: dict, args) -> str:
    lines = [
        "# Service benchmark: streaming over gRPC against in-process generation",
        "",
        f"`python -m benchmarks.service` on {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"model `models/swapmoe-lm` (every expert resident); {args.rounds} rounds x clients, "
        f"{args.new_tokens} new tokens per request, greedy. The gRPC executor is a separate process on loopback.",
        "",
        "| clients | path | tokens/s (aggregate) | TTFT p50 ms | TTFT max ms | gRPC / in-process tokens/s | "
        "gRPC / in-process TTFT p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    goal = None
    for clients in args.clients:
        base = results[(clients, "in-process")]
        for name in ("in-process", "gRPC"):
            r = results[(clients, name)]
            rate = r["tokens"] / r["seconds"]
            ratio = rate / (base["tokens"] / base["seconds"])
            ttft = statistics.median(r["ttfts"]) * 1e3
            ttft_ratio = ttft / (statistics.median(base["ttfts"]) * 1e3)
            if clients == 1 and name == "gRPC":
                goal = ratio
            lines.append(f"| {clients} | {name} | {rate:.1f} | {ttft:.1f} | {max(r['ttfts']) * 1e3:.1f} | "
                         f"{ratio:.3f} | {ttft_ratio:.2f} |")
    lines += ["", f"Goal: streaming adds under 5% at one client: gRPC runs at {goal:.3f}x in-process tokens/s "
                  f"({'met' if goal >= 0.95 else 'not met'}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
