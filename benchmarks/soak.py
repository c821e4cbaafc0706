"""Soak: a planner, an executor (the bundled LM), a control node and 20 simulated executors under
steady load, restarted and starved of disk on purpose, for ten minutes; reports every RPC
outcome, lost plans and memory over time.

    python -m benchmarks.soak                 # 10 minutes; writes benchmarks/results/RESULTS-soak.{md,json}
    python -m benchmarks.soak --minutes 2     # a short run (report written all the same)

Load: 16 clients stream Generate back to back (some cancel after two chunks, some run into a
0.5 s deadline), 3 telemetry subscribers read continuously, the budget changes every 10 s
(between the executor's minimum and the whole model), an operator pins a plan or unpins every
45 s, and the planner and the executor are restarted in turn every 2 minutes (SIGTERM, same
port, same state directory). Each planner restart comes in the middle of a staged rollout over
all 21 executors (after its canary's ACK), which must still succeed. After the first executor
restart, the disk fills under the planner, the executor and the control node for a minute
(``soak_faults``): every
plan must still be ACKed, both sides must say what they could not write, and once space
returns everything must be on disk again without a restart. UNAVAILABLE while a process
restarts, and the cancellations and deadlines the clients cause themselves, are expected; any
other failure is an error. After each restart the planner's acknowledged plan, its pinned flag
and the executor's running plan must agree again within 30 s, or a plan was lost. Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from benchmarks import soak_faults
from swapmoe.core.sizes import format_size
from swapmoe.models.bundled import LM_DIR
from swapmoe.orchestration.processes import spawn
from swapmoe.rpc import transport
from swapmoe.simulation.fleet import SimSettings, SimulatedFleet
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc
from swapmoe.v1 import telemetry_pb2 as tpb

HERE = Path(__file__).parent
NODE = "soak"
PROMPTS = ["def fibonacci(n):", "import os\n", "The history of", "class Stack:\n    def push(self, x):",
           "Once upon a time", "for i in range(10):"]
EXPECTED = {"CANCELLED", "DEADLINE_EXCEEDED"}  # caused by the clients themselves
SIMULATED = 20  # executors beside the real one, on the planner's Connect protocol (swapmoe.simulation.fleet)
DISK_FULL_S = 60.0


class Soak:
    def __init__(self, minutes: float, clients: int, restart_every: float):
        self.end = time.monotonic() + minutes * 60
        self.clients, self.restart_every = clients, restart_every
        self.tmp = Path(tempfile.mkdtemp(prefix="swapmoe-soak-"))
        self.outcomes: collections.Counter = collections.Counter()
        self.unexpected: list[str] = []
        self.lost: list[str] = []
        self.samples: list[dict] = []
        self.restarts: list[str] = []
        self.tokens = 0
        self.lock = threading.Lock()
        self.restarting = threading.Event()  # UNAVAILABLE is expected while set
        self.rollouts: list[soak_faults.RolloutAcrossRestart] = []
        self.disk_full: soak_faults.DiskFullPhase | None = None
        self.planner = spawn("planner", self._planner_args(0), log_dir=self.tmp)
        self.executor = spawn("executor", self._executor_args(0), log_dir=self.tmp)
        self.fleet = spawn("fleet", ["fleet", "serve", "--port", "0", "--planner", self.planner.address,
                                     "--state-dir", str(self.tmp / "fleet")], log_dir=self.tmp)
        self.simulated = SimulatedFleet(SimSettings(self.planner.address, count=SIMULATED, prefix="soak-sim-")).start()

    # --- processes ------------------------------------------------------------------------
    def _planner_args(self, port: int) -> list[str]:
        return ["planner", "serve", "--port", str(port), "--state-dir", str(self.tmp / "planner")]

    def _executor_args(self, port: int) -> list[str]:
        return ["executor", "serve", "--model", str(LM_DIR), "--budget", "1GiB", "--port", str(port),
                "--planner", self.planner.address, "--node-id", NODE, "--state-dir", str(self.tmp / "executor"),
                "--drain-seconds", "5"]

    def restart(self, which: str) -> None:
        self.restarting.set()
        rollout = self.start_rollout() if which == "planner" else None
        before = self.status()
        service = getattr(self, which)
        port = int(service.address.rsplit(":", 1)[1])
        code = service.stop()
        started = time.monotonic()
        setattr(self, which, spawn(which, (self._planner_args if which == "planner" else self._executor_args)(port),
                                   log_dir=self.tmp))
        self.restarts.append(f"{which} (exit {code}, back in {time.monotonic() - started:.1f} s)")
        self.check_plans(f"after the {which} restart", before)
        if rollout is not None:
            self.finish_rollout(*rollout)
        time.sleep(5)  # clients reconnect
        self.restarting.clear()

    def start_rollout(self):
        """A staged rollout over every executor, once its canary ACKed (the planner restarts next)."""
        described = self.describe()
        if described is None:
            return None
        try:
            stub, rollout = soak_faults.start_rollout(self.fleet.address, len(described.layout.layers))
            soak_faults.wait_canary(stub, rollout)
            self.record("StartRollout", "OK")
            return stub, rollout, time.monotonic()
        except grpc.RpcError as error:
            self.record("StartRollout", error.code().name, error.details())
            return None

    def finish_rollout(self, stub, rollout: soak_faults.RolloutAcrossRestart, started: float) -> None:
        soak_faults.finish(stub, rollout, started)
        self.rollouts.append(rollout)
        if rollout.state != "ROLLOUT_STATE_SUCCEEDED":
            self.unexpected.append(f"{rollout.rollout_id} across a planner restart: {rollout.state} {rollout.message}")

    def fill_disk(self, seconds: float) -> None:
        """Every process's file writes fail for ``seconds`` while the load goes on; then space returns."""
        pids = [s.process.pid for s in (self.planner, self.executor, self.fleet)]
        phase = self.disk_full = soak_faults.DiskFullPhase(seconds)
        soak_faults.full_disk(pids, True)
        try:
            described = self.describe()
            if described is not None:
                self.push(random.Random(len(self.restarts)), described, pin=True)  # a plan to save, now
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                soak_faults.watch_disk_full(self, phase)
                time.sleep(2)
        finally:
            soak_faults.full_disk(pids, False)
        soak_faults.wait_recovered(self, phase, self.tmp / "executor", time.monotonic())
        if phase.missing:
            self.lost.append(f"after the full disk: {phase.missing}")

    # --- RPCs -----------------------------------------------------------------------------
    def record(self, method: str, code: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[(method, code)] += 1
            if code not in ("OK", "NACK") and code not in EXPECTED and not (
                    code == "UNAVAILABLE" and self.restarting.is_set()):
                self.unexpected.append(f"{time.strftime('%H:%M:%S')} {method} {code}: {detail}")

    def executor_stub(self):
        return executor_pb2_grpc.ExecutorServiceStub(transport.channel(self.executor.address))

    def planner_stub(self):
        return planner_pb2_grpc.PlannerServiceStub(transport.channel(self.planner.address))

    def planner_status(self) -> ppb.PlanStatusResponse | None:
        try:
            answer = self.planner_stub().GetPlanStatus(ppb.PlanStatusRequest(node_ids=[NODE]), timeout=5)
            self.record("GetPlanStatus", "OK")
            return answer
        except grpc.RpcError as error:
            self.record("GetPlanStatus", error.code().name, error.details())
            return None

    def status(self) -> ppb.ExecutorStatus | None:
        answer = self.planner_status()
        return answer.executors[0] if answer is not None else None

    def describe(self) -> epb.DescribeResponse | None:
        try:
            d = self.executor_stub().Describe(epb.DescribeRequest(), timeout=5)
            self.record("Describe", "OK")
            return d
        except grpc.RpcError as error:
            self.record("Describe", error.code().name, error.details())
            return None

    def check_plans(self, when: str, before: ppb.ExecutorStatus | None) -> None:
        """The planner's acknowledged plan and the executor's must agree again; a pin must survive."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, described = self.status(), self.describe()
            if status and described and status.connected and status.state == ppb.PLAN_STATE_ACKED \
                    and status.acked_plan == described.plan:
                if before is not None and before.pinned and (not status.pinned or status.desired_plan.experts_per_layer
                                                             != before.desired_plan.experts_per_layer):
                    self.lost.append(f"{when}: the pinned plan {list(before.desired_plan.experts_per_layer)} "
                                     f"became {list(status.desired_plan.experts_per_layer)} (pinned {status.pinned})")
                return
            time.sleep(0.5)
        self.lost.append(f"{when}: planner and executor disagree after 30 s: planner {status and status.acked_plan}, "
                         f"executor {described and described.plan}")

    # --- load -------------------------------------------------------------------------------
    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < self.end:
            request = epb.GenerateRequest(text=rng.choice(PROMPTS), max_new_tokens=rng.randint(4, 48))
            mode = rng.choice(["full"] * 6 + ["cancel", "deadline"])
            try:
                stream = self.executor_stub().Generate(request, timeout=0.5 if mode == "deadline" else 120)
                for n, chunk in enumerate(stream):
                    if chunk.finish_reason:
                        with self.lock:
                            self.tokens += chunk.usage.completion_tokens
                    if mode == "cancel" and n == 1:
                        stream.cancel()
                        break
                self.record("Generate", "CANCELLED" if mode == "cancel" else "OK")
            except grpc.RpcError as error:
                self.record("Generate", error.code().name, error.details())
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.5)

    def subscriber(self) -> None:
        while time.monotonic() < self.end:
            try:
                stream = self.executor_stub().Subscribe(epb.SubscribeRequest(
                    interval_ms=500, topics=[tpb.TOPIC_MEMORY, tpb.TOPIC_THROUGHPUT, tpb.TOPIC_EVENTS]),
                    timeout=max(1.0, self.end - time.monotonic()))
                for _ in stream:
                    pass
                self.record("Subscribe", "OK")
            except grpc.RpcError as error:
                self.record("Subscribe", error.code().name, error.details())
                time.sleep(0.5)

    def sampler(self) -> None:
        start = time.monotonic()
        while time.monotonic() < self.end:
            described = self.describe()
            rss = {name: _rss(getattr(self, name).process.pid) for name in ("executor", "planner", "fleet")}
            if described is not None:
                m = described.memory
                self.samples.append(dict(t=round(time.monotonic() - start), executor_rss=rss["executor"],
                                         planner_rss=rss["planner"], fleet_rss=rss["fleet"], accounted=m.accounted_bytes,
                                         budget=m.budget_bytes, over_budget=m.accounted_bytes > m.budget_bytes))
            time.sleep(10)

    def control(self) -> None:
        rng, tick, restarts = random.Random(7), 0, ["planner", "executor"]
        next_restart = time.monotonic() + self.restart_every
        while time.monotonic() < self.end - 20:
            time.sleep(10)
            tick += 1
            described = self.describe()
            if described is not None:
                full = described.min_budget_bytes + sum((l.num_experts - 1) * l.bytes_per_expert
                                                        for l in described.layout.layers)
                budget = rng.randint(described.min_budget_bytes, full)
                try:
                    self.executor_stub().SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="soak"), timeout=10)
                    self.record("SetBudget", "OK")
                except grpc.RpcError as error:
                    self.record("SetBudget", error.code().name, error.details())
                if tick % 4 == 0:
                    self.push(rng, described)
            if time.monotonic() >= next_restart:
                self.restart(restarts[0])
                if restarts[0] == "executor" and self.disk_full is None:
                    self.fill_disk(DISK_FULL_S)  # after the first executor restart, before the next planner one
                restarts.reverse()
                next_restart = time.monotonic() + self.restart_every

    def push(self, rng: random.Random, described: epb.DescribeResponse, pin: bool = False) -> None:
        """Pin a small plan (it fits any budget the soak sets) or, every other time, unpin."""
        request = ppb.PushPlanRequest(node_ids=[NODE])
        if pin or rng.random() < 0.5:
            request.plan.CopyFrom(common_pb2.Plan(experts_per_layer=[rng.randint(1, 2) for _ in described.layout.layers],
                                                  update_frequency=rng.choice([1, 4, 16]), origin="soak operator"))
        try:
            self.planner_stub().PushPlan(request, timeout=10)
            self.record("PushPlan", "OK")
        except grpc.RpcError as error:
            self.record("PushPlan", error.code().name, error.details())

    # --- run and report ----------------------------------------------------------------------
    def run(self) -> dict:
        started = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        threads += [threading.Thread(target=self.subscriber, daemon=True) for _ in range(3)]
        threads += [threading.Thread(target=self.sampler, daemon=True)]
        for thread in threads:
            thread.start()
        progress = threading.Thread(target=self.progress, daemon=True)
        progress.start()
        self.control()
        for thread in threads:
            thread.join(timeout=max(1.0, self.end - time.monotonic() + 130))
        self.check_plans("at the end", self.status())
        seconds = time.monotonic() - started
        self.simulated.stop()
        for service in (self.fleet, self.executor, self.planner):
            service.stop()
        return dict(seconds=round(seconds), clients=self.clients, tokens=self.tokens,
                    tokens_per_second=round(self.tokens / seconds, 1), restarts=self.restarts,
                    outcomes={f"{m} {c}": n for (m, c), n in sorted(self.outcomes.items())},
                    unexpected=self.unexpected, lost_plans=self.lost, samples=self.samples,
                    rollouts=[r.to_json() for r in self.rollouts],
                    disk_full=self.disk_full.to_json() if self.disk_full else None,
                    machine=f"{platform.machine()}, {psutil.cpu_count()} cores, "
                            f"{format_size(psutil.virtual_memory().total)}")

    def progress(self) -> None:
        while time.monotonic() < self.end:
            time.sleep(30)
            with self.lock:
                calls = sum(self.outcomes.values())
            print(f"{max(0, self.end - time.monotonic()) / 60:.1f} min left: {calls} calls, {self.tokens} tokens, "
                  f"{len(self.unexpected)} unexpected, {len(self.lost)} lost plans, restarts {len(self.restarts)}",
                  flush=True)


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def report(result: dict, command: str) -> str:
    rows = "\n".join(f"| {k} | {n} |" for k, n in result["outcomes"].items())
    per_minute = {s["t"] // 60: s for s in result["samples"]}
    memory = "\n".join(f"| {m} | {format_size(s['executor_rss'])} | {format_size(s['planner_rss'])} | "
                       f"{format_size(s['fleet_rss'])} | {format_size(s['accounted'])} | {format_size(s['budget'])} |"
                       for m, s in sorted(per_minute.items()))
    over = sum(s["over_budget"] for s in result["samples"])
    verdict = "PASS" if not result["unexpected"] and not result["lost_plans"] and not over else "FAIL"
    listing = lambda items: "\n".join(f"- {i}" for i in items[:50]) or "- none"  # noqa: E731
    return f"""# Soak: planner, executor and control node under load, with restarts and a full disk

`{command}` on {result['machine']}; {result['seconds']} s, {result['clients']} streaming clients, 3 subscribers,
{SIMULATED} simulated executors beside the real one, a budget change every 10 s, a plan pinned or unpinned every
45 s, restarts: {', '.join(result['restarts']) or 'none'}.

**Verdict: {verdict}.** {len(result['unexpected'])} unexpected outcomes, {len(result['lost_plans'])} lost plans,
{over} of {len(result['samples'])} memory samples over budget; {result['tokens']} tokens streamed
({result['tokens_per_second']} tokens/s overall, restarts included).

## Outcomes (method, status: calls)
UNAVAILABLE is expected only while a process restarts; CANCELLED and DEADLINE_EXCEEDED are the
clients' own doing (1 in 8 cancels after two chunks, 1 in 8 has a 0.5 s deadline).

| outcome | calls |
|---|---|
{rows}

## Unexpected outcomes
{listing(result['unexpected'])}

## Lost plans
{listing(result['lost_plans'])}

{soak_faults.report(result)}
## Memory over time (first sample of each minute)
| minute | executor RSS | planner RSS | control node RSS | executor accounted | budget |
|---|---|---|---|---|---|
{memory}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--restart-every", type=float, default=120, help="seconds between restarts")
    args = parser.parse_args(argv)
    result = Soak(args.minutes, args.clients, args.restart_every).run()
    command = "python -m benchmarks.soak" + ("" if args.minutes == 10 else f" --minutes {args.minutes:g}")
    text = report(result, command)
    print(text)
    (HERE / "results" / "RESULTS-soak.md").write_text(text)
    (HERE / "results" / "RESULTS-soak.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
