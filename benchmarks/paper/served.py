"""The deployed system (paper Table 1: budget, memory and latency as served): an executor
process on loopback, given the planner's plan at each budget over its own RPCs (``ApplyPlan``,
then ``SetBudget`` down to what the plan accounts for, so the budget is tight), then streaming
``Generate`` to a gRPC client that times it; memory as the executor's telemetry reports it."""

from __future__ import annotations

import sys
import time

from benchmarks.paper import planned
from benchmarks.paper.context import Context
from benchmarks.paper.tables import num, share, table

BIG = 1 << 30  # a start-up budget every plan fits; each budget is then set to the plan's own bytes


def measure(ctx: Context) -> dict:
    from swapmoe.core.plan import Plan
    from swapmoe.orchestration.processes import spawn
    from swapmoe.rpc import transport
    from swapmoe.rpc.convert import plan_to_pb
    from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

    server = spawn("executor", ["executor", "serve", "--model", str(ctx.lm), "--budget", str(BIG), "--port", "0",
                                "--max-batch", "1", "--threads", str(ctx.threads)])
    channel = transport.channel(server.address)
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)
    rows = []
    try:
        version = stub.Describe(epb.DescribeRequest(), timeout=60).plan.version
        for s in (0.25, 0.5) if ctx.quick else (0.25, 0.5, 0.75, 1.0):
            plan = planned.plan(s)
            stub.SetBudget(epb.SetBudgetRequest(budget_bytes=BIG, reason="paper benchmark: next budget"), timeout=60)
            version += 1
            applied = stub.ApplyPlan(epb.ApplyPlanRequest(plan=plan_to_pb(Plan(
                version, plan.experts_per_layer, plan.update_frequency, origin=f"paper benchmark {s:.2f}"))), timeout=120)
            if not applied.accepted:
                raise RuntimeError(f"the executor refused the planner's plan at {s:.0%}: {applied.reason}")
            budget = applied.memory.accounted_bytes
            cut = stub.SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="paper benchmark: tight budget"),
                                 timeout=120)
            print(f"[paper] served {s:.0%}: budget {budget / 2**20:.1f} MiB", file=sys.stderr, flush=True)
            ttft, rates, tokens = [], [], 0
            for prompt in ctx.prompt_ids:
                times = _stream(stub, epb, prompt, ctx.sizes.new_tokens)
                tokens += len(times) - 1
                ttft.append(times[1] - times[0])
                if len(times) > 2:  # the stream ends at EOS: a one-token answer has no decode rate
                    rates.append((len(times) - 2) / (times[-1] - times[1]))
            memory = stub.Describe(epb.DescribeRequest(), timeout=60)
            rows.append(dict(share=s, budget_mib=budget / 2**20, planned_mib=plan.budget_bytes / 2**20, tokens=tokens,
                             experts_per_layer=list(cut.achieved_experts_per_layer or applied.achieved_experts_per_layer),
                             planned_experts_per_layer=list(plan.experts_per_layer),
                             accounted_mib=memory.memory.accounted_bytes / 2**20,
                             rss_mib=memory.memory.process_rss_bytes / 2**20,
                             peak_rss_mib=memory.memory.process_peak_rss_bytes / 2**20,
                             ttft_ms=sorted(ttft)[len(ttft) // 2] * 1e3,
                             tokens_per_second=sum(rates) / len(rates) if rates else 0.0,
                             apply_ms=applied.apply_ns / 1e6))
    finally:
        channel.close()
        server.stop()
    return dict(rows=rows, prompts=len(ctx.prompt_ids), new_tokens=ctx.sizes.new_tokens)


def _stream(stub, epb, prompt: list[int], new_tokens: int) -> list[float]:
    """Arrival times of a greedy stream's tokens, the request's start first."""
    times = [time.perf_counter()]
    request = epb.GenerateRequest(token_ids=epb.TokenIds(ids=prompt), max_new_tokens=new_tokens)
    for chunk in stub.Generate(request, timeout=600):
        times += [time.perf_counter()] * len(chunk.token_ids)
    return times


def render(results: dict, figures) -> list[str]:
    rows = results["rows"]
    lines = ["## The deployed executor under each budget (Table 1, as served)", "",
             f"One `swapmoe executor serve` process on loopback; at each budget the planner's plan arrives by "
             f"`ApplyPlan`, the budget is cut by `SetBudget` to the bytes that plan accounts for, then a gRPC "
             f"client streams {results['prompts']} prompts of up to {results['new_tokens']} greedy tokens (a "
             "stream ends at EOS). 'Planned MiB' is what the planner's memory model counts for the plan (weights "
             "only); the executor's budget adds its reserve for the KV cache, activations and staging. Memory is "
             "the executor's own report (`Describe`): bytes accounted, and the process's peak RSS since it "
             "started (the libraries included).", ""]
    lines += table(("budget (share of experts)", "planned MiB", "budget MiB", "experts per layer kept",
                    "accounted MiB", "peak RSS MiB", "tokens streamed", "TTFT ms", "tokens/s", "plan applied in ms"),
                   [(share(r["share"]), r["planned_mib"], r["budget_mib"],
                     " ".join(str(k) for k in r["experts_per_layer"]), r["accounted_mib"], r["peak_rss_mib"],
                     r["tokens"], r["ttft_ms"], r["tokens_per_second"], r["apply_ms"]) for r in rows])
    fig, axes = figures.new(1)
    ax = axes[0][0]
    ax.plot([r["budget_mib"] for r in rows], [r["tokens_per_second"] for r in rows], marker="o", label="tokens/s")
    ax.set_xlabel("budget (MiB)")
    ax.set_ylabel("decode tokens/s over gRPC")
    twin = ax.twinx()
    twin.plot([r["budget_mib"] for r in rows], [r["accounted_mib"] for r in rows], marker="s", color="C1",
              label="accounted MiB")
    twin.set_ylabel("accounted MiB")
    lines += [figures.save(fig, "served", "The served executor: speed and memory per budget"), ""]
    return lines


def claims(results: dict) -> list[tuple[str, str, str, str]]:
    from benchmarks.paper.paper_size import PAPER
    rows = results["rows"]
    kept = [r for r in rows if r["experts_per_layer"] == r["planned_experts_per_layer"]
            and r["accounted_mib"] <= r["budget_mib"] * 1.0001]
    return [("The executor serves the plan found for a budget within that budget",
             f"SwitchT-16, 2.0 GiB budget: {PAPER[2.0]} (Table 1); 3.5 GiB: {PAPER[3.5]} (not always met)",
             f"{len(kept)} of {len(rows)} budgets served with the plan kept whole and accounted within the budget "
             f"(e.g. {num(rows[0]['accounted_mib'])} of {num(rows[0]['budget_mib'])} MiB at "
             f"{share(rows[0]['share'])}; the budget is the plan's own bytes, so a plan the executor counted "
             "differently would have been cut)", "yes" if len(kept) == len(rows) else "no")]
