"""``swapmoe demo``: the planner whole, with a planner and an executor as separate processes.

In order: the even split while the planner profiles the device through its stream; the searched
plan (predicted and measured figures, and why); a budget cut answered from the frontier; a
workload shift (prompts from another domain) answered with that domain's plan. Each stage
prints ``swapmoe planner status``. The bundled LM's accuracy profile ships with it, so the
planner needs no flag; a model without one gets the even split throughout, and says so.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import grpc

from swapmoe.cli import client
from swapmoe.core.budget import MemoryModel
from swapmoe.core.sizes import format_size, parse_size
from swapmoe.models.bundled import LM_DIR
from swapmoe.orchestration.processes import spawn
from swapmoe.rpc import convert, transport
from swapmoe.v1 import executor_pb2 as epb, planner_pb2 as ppb, planner_pb2_grpc

NODE = "demo-device"
SEARCH_TIMEOUT_S = 180  # the device profile and the first search take about a minute on 2 cores
SHIFT_TIMEOUT_S = 90


def default_model() -> Path:
    """The embedded demo model: the bundled swapmoe-lm checkpoint (models/swapmoe-lm)."""
    if not (LM_DIR / "config.json").exists():
        raise FileNotFoundError(f"the bundled checkpoint is missing from {LM_DIR}; "
                                "train it with python -m swapmoe.models.training.train_lm or pass --model")
    return LM_DIR


def _checkpoint_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


class Demo:
    def __init__(self, planner: str, executor: str, started: float):
        self.planner, self.executor, self.started = planner, executor, started
        self.stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(planner))

    def status(self) -> ppb.ExecutorStatus | None:
        """The executor's status, None until it has registered."""
        try:
            return self.stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[NODE]), timeout=10).executors[0]
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            return None

    def wait(self, ready, timeout: float, what: str, between=lambda: time.sleep(0.2)) -> ppb.ExecutorStatus:
        """The status once ``ready(status)``; ``between`` runs while it is not (traffic, a pause)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and status.state == ppb.PLAN_STATE_ACKED and ready(status):
                return status
            between()
        raise TimeoutError(f"{what} did not happen within {timeout:.0f} s; see `swapmoe planner status "
                           f"--planner {self.planner}`")

    def stage(self, title: str) -> None:
        print(f"\n=== {title} (at {time.monotonic() - self.started:.1f} s)")
        client.print_plan_status(self.planner, [NODE])

    def generate(self, text: str, max_new_tokens: int = 24) -> None:
        for _ in client.executor_stub(self.executor).Generate(
                epb.GenerateRequest(text=text, max_new_tokens=max_new_tokens), timeout=60):
            pass


def _searched(status: ppb.ExecutorStatus) -> bool:
    return status.desired_plan.origin.startswith("planner:search")


def run_demo(args) -> int:
    model = Path(args.model) if args.model else default_model()
    with tempfile.TemporaryDirectory(prefix="swapmoe-demo-") as logs:
        logs = Path(logs)
        started = time.monotonic()
        planner = spawn("planner", ["planner", "serve", "--port", "0"], log_dir=logs)
        services = [planner]
        try:
            budget = parse_size(args.budget) if args.budget else 4 * _checkpoint_bytes(model) + (64 << 20)
            executor = spawn("executor", ["executor", "serve", "--model", str(model), "--budget", str(budget),
                                          "--port", "0", "--planner", planner.address, "--node-id", NODE],
                             log_dir=logs)
            services.append(executor)
            print(f"planner  {planner.address}\nexecutor {executor.address} (node {NODE}), budget {format_size(budget)}")
            demo = Demo(planner.address, executor.address, started)
            first = demo.wait(lambda s: True, 60, "the first plan's ACK")
            demo.stage("1. the even split, while the planner profiles the device through its stream")
            if "no accuracy profile" in first.desired_plan.origin:
                print("no accuracy profile of this model (make one: swapmoe profile accuracy --model DIR): "
                      "the even split is what it gets")
                searched = False
            else:
                demo.wait(_searched, SEARCH_TIMEOUT_S, "a searched plan")
                print(f"\nstreaming {args.prompt!r} under the searched plan:")
                client.stream_generation(executor.address, args.prompt, max_new_tokens=args.max_new_tokens)
                demo.wait(lambda s: s.throughput.tokens_per_second > 0, 30, "throughput telemetry")
                demo.stage("2. the searched plan: predicted by the performance models, then measured")
                searched = True
            cut = _cut_budget(executor.address)
            print(f"\ncutting the budget to {format_size(cut)} (3/4 of the experts beside a full batch)")
            client.set_budget(executor.address, cut, "demo: another app needs memory")
            at = time.monotonic()
            demo.wait(lambda s: s.budget_bytes == cut and (_searched(s) or not searched), SEARCH_TIMEOUT_S,
                      "a plan for the new budget")
            demo.stage(f"3. the budget cut, answered in {time.monotonic() - at:.1f} s")
            if searched:
                _shift(demo, demo.status().workload)
            return 0
        finally:
            for service in reversed(services):
                service.stop()


def _cut_budget(executor: str) -> int:
    """Room for 3/4 of the experts beside a full batch."""
    d = client.executor_stub(executor).Describe(epb.DescribeRequest(), timeout=30)
    memory = MemoryModel(convert.layout_from_pb(d.layout), convert.reserve_from_pb(d.reserve))
    experts = d.layout.total_bytes - d.layout.dense_bytes
    per_layer = sum(l.bytes_per_expert for l in d.layout.layers)
    return memory.smallest_plan_bytes + experts * 3 // 4 - per_layer


def _shift(demo: Demo, workload: str) -> None:
    """Prompts from one domain until the planner recognises it and the plan searched for it (a frontier
    of its own, searched once the shift is seen) is ACKed."""
    from swapmoe.models.corpus import DOMAINS, load_eval

    domain = next(d for d in sorted(DOMAINS) if d != workload)  # its frontier is searched next once seen
    texts = [row["text"][:600] for row in load_eval(domain)]
    sent = itertools.count()
    print(f"\nsending {domain} prompts (held-out text) until the planner sees the shift from {workload or 'none'!r}")
    at = time.monotonic()
    demo.wait(lambda s: s.workload == domain and f"workload={domain} " in s.desired_plan.origin, SHIFT_TIMEOUT_S,
              f"a plan for the {domain} workload", between=lambda: demo.generate(texts[next(sent) % len(texts)]))
    demo.stage(f"4. the workload shift to {domain!r}, answered in {time.monotonic() - at:.1f} s")
