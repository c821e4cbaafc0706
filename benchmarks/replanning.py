"""How fast the planner answers a device: real planner and executor processes on loopback.

    python -m benchmarks.replanning          # writes benchmarks/results/RESULTS-replanning.md

The planner gets the bundled LM's stored accuracy profile (``profiles``) and a
fresh state directory, so it measures the device through its Connect stream and searches the
frontiers before the first searched plan. Then:

- **budget changes**: the executor's budget is cut and restored, again and again; the time from
  the device's BudgetChange event to the new plan applied is read from the executor's own
  event timestamps (one clock), and the time to the ACK seen in the planner's status is the
  client's wall time from the SetBudget call.
- **workload changes**: prompts of one domain until the planner recognises it, then of
  another; the time from the first request of the new domain to the plan for it applied.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from swapmoe.core.sizes import format_size
from swapmoe.models.bundled import LM_DIR
from swapmoe.orchestration.processes import spawn
from swapmoe.profiler.workloads import rows
from swapmoe.rpc import transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-replanning.md"
NODE = "bench-lm"


class Events:
    """The executor's events (budget changes, plans applied) as they happen, with its timestamps."""

    def __init__(self, stub):
        self.items: list[tuple[int, int, str, int]] = []  # (timestamp_ns, kind, message, plan_version)
        self.call = stub.Subscribe(epb.SubscribeRequest(topics=[tpb.TOPIC_EVENTS]))
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for event in self.call:
                e = event.event
                with self.lock:
                    self.items.append((event.timestamp_ns, e.kind, e.message, e.plan_version))
        except Exception:  # noqa: BLE001 - cancelled at the end
            pass

    def after(self, start: int, kind: int, version: int | None = None):
        with self.lock:
            return next((e for e in self.items if e[0] >= start and e[1] == kind
                         and (version is None or e[3] == version)), None)


def wait(condition, timeout=600.0, step=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(step)
    raise TimeoutError("condition not met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20, help="budget changes to time (default 20)")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="replanning-"))
    planner = spawn("planner", ["planner", "serve", "--port", "0", "--profiles", str(HERE.parent / "models" / "profiles"),
                                "--state-dir", str(state / "planner")], log_dir=state)
    began = time.monotonic()
    executor = spawn("executor", ["executor", "serve", "--model", str(LM_DIR), "--budget", "64MiB", "--port", "0",
                                  "--planner", planner.address, "--node-id", NODE], log_dir=state)
    try:
        run(planner, executor, began, args)
    finally:
        executor.stop()
        planner.stop()


def status(planner_stub):
    """The planner's view of the executor (an empty status until it has registered)."""
    try:
        return planner_stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[NODE]), timeout=5).executors[0]
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return ppb.ExecutorStatus()


def run(planner, executor, began, args) -> None:
    pstub = planner_pb2_grpc.PlannerServiceStub(transport.channel(planner.address))
    estub = executor_pb2_grpc.ExecutorServiceStub(transport.channel(executor.address))
    events = Events(estub)
    first = wait(lambda: (s := status(pstub)).state == ppb.PLAN_STATE_ACKED and s.desired_plan.origin.startswith(
        "planner:search") and s, timeout=900, step=0.2)
    to_searched = time.monotonic() - began
    print(f"first searched plan ACKed {to_searched:.1f} s after the executor started: {first.desired_plan.origin}")
    time.sleep(60)  # let every workload's frontier finish, so budget changes are answered from one
    described = estub.Describe(epb.DescribeRequest(), timeout=5)
    full = first.budget_bytes
    low = (described.min_budget_bytes + described.memory.accounted_bytes) // 2
    budget_rows = []
    for i in range(args.changes):
        # Cuts spread between the half-way budget and just under the full model's bytes, each
        # followed by a restore: every change needs a new plan.
        budget = low + (i // 2 % 5) * (first.predicted.memory_bytes - 1 - low) // 5 if i % 2 == 0 else full
        start_ns, t0 = time.time_ns(), time.perf_counter()
        estub.SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="benchmark"), timeout=30)
        acked = wait(lambda: (s := status(pstub)).budget_bytes == budget and s.state == ppb.PLAN_STATE_ACKED
                     and s.acked_plan.version == s.desired_plan.version and s, timeout=30)
        ack_s = time.perf_counter() - t0
        changed = wait(lambda: events.after(start_ns, tpb.Event.KIND_BUDGET_CHANGED), timeout=10)
        applied = events.after(changed[0], tpb.Event.KIND_PLAN_APPLIED)
        to_applied = (applied[0] - changed[0]) / 1e6 if applied else None
        apply_ms = acked.last_result.apply_ns / 1e6
        budget_rows.append(dict(budget=budget, to_applied_ms=to_applied, apply_ms=apply_ms,
                                to_plan_ms=to_applied - apply_ms if to_applied is not None else None,
                                to_ack_seen_ms=ack_s * 1e3, origin=acked.desired_plan.origin))
        print(f"budget {format_size(budget)}: plan received {budget_rows[-1]['to_plan_ms']} ms after the change, "
              f"applied in {apply_ms:.1f} ms; ACK seen after {ack_s * 1e3:.1f} ms ({acked.desired_plan.origin})")
        time.sleep(1.5)  # let a refined search (if any) land before the next change
    workload_rows = []
    for domain in ("prose", "manual", "code", "prose", "code"):
        if status(pstub).workload == domain:
            continue  # recognised already (the device profile's own traffic may have been one domain)
        texts = rows(domain, "judging")
        start_ns, t0, i = time.time_ns(), time.perf_counter(), 0
        stop = threading.Event()

        def traffic():
            nonlocal i
            while not stop.is_set():
                for _ in estub.Generate(epb.GenerateRequest(text=texts[i % len(texts)]["text"][:600],
                                                            max_new_tokens=24), timeout=60):
                    pass
                i += 1

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            wait(lambda: status(pstub).workload == domain, timeout=120, step=0.01)
            seen_s = time.perf_counter() - t0
            plan = wait(lambda: (st := status(pstub)).state == ppb.PLAN_STATE_ACKED
                        and f"workload={domain} " in st.desired_plan.origin and st.desired_plan, timeout=60, step=0.01)
            applied = wait(lambda: events.after(start_ns, tpb.Event.KIND_PLAN_APPLIED, plan.version), timeout=10)
        finally:
            stop.set()
            thread.join()
        workload_rows.append(dict(domain=domain, recognised_s=seen_s, applied_s=(applied[0] - start_ns) / 1e9,
                                  requests=i))
        print(f"{domain}: recognised after {seen_s:.2f} s, its plan applied after {workload_rows[-1]['applied_s']:.2f} s")
    final = status(pstub)
    write_report(args.report, to_searched, first, budget_rows, workload_rows, final)


def write_report(path: Path, to_searched, first, budget_rows, workload_rows, final) -> None:
    applied = [r["to_applied_ms"] for r in budget_rows if r["to_applied_ms"] is not None]
    on_wire = [r["to_plan_ms"] for r in budget_rows if r["to_plan_ms"] is not None]
    apply = [r["apply_ms"] for r in budget_rows]
    acks = [r["to_ack_seen_ms"] for r in budget_rows]
    lines = [
        "# Replanning: budget and workload changes, real processes on loopback", "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; planner and executor as separate "
        f"processes (`python -m benchmarks.replanning`), the bundled LM, the stored accuracy profile, a fresh "
        f"planner state (the device is profiled through its Connect stream).", "",
        f"- Executor start to the first searched plan ACKed (device profile + first frontier): **{to_searched:.1f} s**; "
        f"its origin: `{first.desired_plan.origin}`.", "",
        "## Budget change to new plan", "",
        f"{len(budget_rows)} budget changes (SetBudget on the executor; the executor tells the planner, the planner "
        f"answers from the frontier).", "",
        "| | median | p90 | max |", "|---|---|---|---|",
        f"| BudgetChange event to the new plan received (applied minus the apply time the ACK reports) | "
        f"{_q(on_wire, .5):.1f} ms | {_q(on_wire, .9):.1f} ms | {max(on_wire):.1f} ms |",
        f"| applying it on the executor (PlanResult.apply_ns) | {_q(apply, .5):.1f} ms | {_q(apply, .9):.1f} ms "
        f"| {max(apply):.1f} ms |",
        f"| BudgetChange event to plan applied (executor's clock) | {_q(applied, .5):.1f} ms | {_q(applied, .9):.1f} ms "
        f"| {max(applied):.1f} ms |",
        f"| SetBudget call to ACK seen in GetPlanStatus (client) | {_q(acks, .5):.1f} ms | {_q(acks, .9):.1f} ms "
        f"| {max(acks):.1f} ms |", "",
        "## Workload change to new plan", "",
        "Prompts of one domain (judging texts) in a loop until the planner recognises it from the executor's expert "
        "telemetry (1 s reports, a window of 4, 3 in a row to switch).", "",
        "| domain | recognised after | its plan applied after | requests |", "|---|---|---|---|",
    ]
    lines += [f"| {r['domain']} | {r['recognised_s']:.2f} s | {r['applied_s']:.2f} s | {r['requests']} |"
              for r in workload_rows]
    lines += ["", f"Final status: workload {final.workload!r}, plan `{final.desired_plan.origin}`, why: {final.reason}", ""]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(dict(to_searched_s=to_searched, budget=budget_rows,
                                                         workload=workload_rows), indent=1))
    print("\n".join(lines))


def _q(values, q):
    return statistics.quantiles(values, n=20, method="inclusive")[int(q * 20) - 1] if len(values) > 1 else values[0]


if __name__ == "__main__":
    main()
