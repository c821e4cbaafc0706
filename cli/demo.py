"""``swapmoe demo``: a planner and an executor as separate processes, a live budget
cut, the planner's new plan acknowledged, and a streamed generation under the budget."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from swapmoe.core.budget import MemoryModel
from swapmoe.core.sizes import format_size, parse_size
from swapmoe.models.bundled import LM_DIR
from swapmoe.cli import client
from swapmoe.orchestration.processes import spawn
from swapmoe.rpc import convert, transport
from swapmoe.v1 import executor_pb2 as epb, planner_pb2 as ppb, planner_pb2_grpc, telemetry_pb2 as tpb


def default_model() -> Path:
    """The embedded demo model: the bundled swapmoe-lm checkpoint (models/swapmoe-lm)."""
    if not (LM_DIR / "config.json").exists():
        raise FileNotFoundError(f"the bundled checkpoint is missing from {LM_DIR}; "
                                "train it with python -m swapmoe.models.training.train_lm or pass --model")
    return LM_DIR


def _checkpoint_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def wait_for_ack(planner_address: str, node_id: str, timeout: float = 60) -> ppb.ExecutorStatus:
    stub = planner_pb2_grpc.PlannerServiceStub(transport.channel(planner_address))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = stub.GetPlanStatus(ppb.PlanStatusRequest(), timeout=10).executors
        status = next((s for s in statuses if s.node_id == node_id), None)
        if status and status.state in (ppb.PLAN_STATE_ACKED, ppb.PLAN_STATE_NACKED):
            return status
        time.sleep(0.1)
    raise TimeoutError(f"executor {node_id} did not answer the planner's plan within {timeout}s")


def _collect_events(address: str, events: list, stop: threading.Event) -> None:
    stream = client.executor_stub(address).Subscribe(
        epb.SubscribeRequest(interval_ms=250, topics=[tpb.TOPIC_EVENTS, tpb.TOPIC_MEMORY]))
    stop_watch = threading.Thread(target=lambda: (stop.wait(), stream.cancel()), daemon=True)
    stop_watch.start()
    try:
        for event in stream:
            events.append(event)
    except Exception:  # noqa: BLE001 - cancelled at the end of the demo
        pass


def run_demo(args) -> int:
    model = Path(args.model) if args.model else default_model()
    node_id = "demo-device"
    with tempfile.TemporaryDirectory(prefix="swapmoe-demo-") as logs:
        logs = Path(logs)
        planner = spawn("planner", ["planner", "serve", "--port", "0"], log_dir=logs)
        services = [planner]
        try:
            start_budget = parse_size(args.budget) if args.budget else 4 * _checkpoint_bytes(model) + (64 << 20)
            executor = spawn("executor", ["executor", "serve", "--model", str(model), "--budget", str(start_budget),
                                          "--port", "0", "--planner", planner.address, "--node-id", node_id],
                             log_dir=logs)
            services.append(executor)
            print(f"planner  {planner.address}\nexecutor {executor.address} (node {node_id})\n")
            events: list = []
            stop = threading.Event()
            threading.Thread(target=_collect_events, args=(executor.address, events, stop), daemon=True).start()
            status = wait_for_ack(planner.address, node_id)
            if not args.budget:  # cut the budget live: keep about 3/4 of the experts (at 1/2 the bundled
                # LM's perplexity goes from 28 to 42: benchmarks/results/RESULTS-runtime.md)
                d = client.executor_stub(executor.address).Describe(epb.DescribeRequest(), timeout=30)
                experts = d.layout.total_bytes - d.layout.dense_bytes
                per_layer = sum(l.bytes_per_expert for l in d.layout.layers)
                memory = MemoryModel(convert.layout_from_pb(d.layout), convert.reserve_from_pb(d.reserve))
                budget = memory.smallest_plan_bytes + experts * 3 // 4 - per_layer  # plans leave room for a full batch
                print(f"cutting the budget to {format_size(budget)}: weights {format_size(d.layout.total_bytes)} in full, "
                      f"minimum budget {format_size(d.min_budget_bytes)} (dense, one expert per layer, one sequence's "
                      f"KV cache and activations, the executor's own allocations); 3/4 of the experts beside a full "
                      f"batch")
                client.set_budget(executor.address, budget, "demo: another app needs memory")
                time.sleep(0.3)
                status = wait_for_ack(planner.address, node_id)
            print(f"planner plan v{status.desired_plan.version} {list(status.desired_plan.experts_per_layer)}: "
                  f"{ppb.PlanState.Name(status.state)} {status.last_result.reason}\n")
            client.print_description(executor.address)
            print()
            client.stream_generation(executor.address, args.prompt, max_new_tokens=args.max_new_tokens)
            time.sleep(0.3)
            stop.set()
            kinds = [tpb.Event.Kind.Name(e.event.kind) for e in events if e.WhichOneof("payload") == "event"]
            memory = [e.memory for e in events if e.WhichOneof("payload") == "memory"]
            print(f"\ntelemetry: {len(events)} events received; events: {', '.join(kinds) or 'none'}")
            if memory:
                print("last memory report: " + client.memory_line(memory[-1]))
            return 0 if status.state == ppb.PLAN_STATE_ACKED else 1
        finally:
            for service in reversed(services):
                service.stop()
