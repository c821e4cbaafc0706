"""The rest of the system at paper size: planner, profiling, plans, a live budget change, a
restart and the OpenAI gateway, between real processes on loopback, each step timed.

    python -m swapmoe.models.paper_scale olmoe-1b-7b              # the checkpoint, once (13.8 GB)
    python -m benchmarks.scale_system ~/.cache/swapmoe/checkpoints/olmoe-1b-7b [--budget 4GiB]
        [--second-budget 2GiB] [--configurations 4] [--work DIR]   # writes RESULTS-scale-system.{md,json}
    python -m benchmarks.scale olmoe-1b-7b --plans benchmarks/results/RESULTS-scale-system-plans.json

Steps (``Scenario.STEPS``):
1. a planner and an executor serving the checkpoint under ``--budget``, dialled out to the planner
   with a state directory (its ACKed plan is saved there);
2. a device profile through the planner's Connect stream (``swapmoe profile device --planner``),
   stored where the planner keeps device profiles;
3. accuracy profiling on Ray with two actors (``swapmoe profile accuracy --max-resident BUDGET``)
   into the planner's ``--profiles`` root: wall time and the peak summed RSS of the scoring
   workers (and of the driver with everything under it: a local Ray, or ``--ray-address``'s);
4. the planner picks that profile up and searches; the searched plan is pushed and ACKed (time
   from the profile written to the ACK, then to the search at the exact budget);
5. SetBudget to ``--second-budget`` while a 48-token stream runs: the call's latency, every
   token delivered, the new budget in force within its bytes; then the planner's plan for it ACKed;
6. the executor restarted (SIGTERM, same port and state directory): time to serving, and the
   saved planner's plan resumed;
7. ``swapmoe http serve`` in front of it: one streamed completion, its time to first token.

Memory: the executor's budget, plus during step 3 two actors each holding the dense weights and
at most ``--budget`` of experts (about 15 GiB in all for OLMoE-1B-7B at 4 GiB). The executor
runs one sequence at a time at ``benchmarks.scale``'s context (1024), so the planner's plans are
searched for the memory ``benchmarks.scale`` serves them with.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from google.protobuf import json_format
from tqdm import tqdm

from benchmarks import scale_system_parts as parts
from benchmarks.replanning import wait
from benchmarks.scale_probe import context
from benchmarks.scale_system_report import Step, memory_figures, plan_json, write
from swapmoe.core.sizes import format_size, parse_size
from swapmoe.orchestration.processes import Service, launch
from swapmoe.rpc import transport
from swapmoe.v1 import common_pb2, executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "RESULTS-scale-system.md"
NODE = "scale-system"
PROMPT = "The history of the city begins with"


@dataclass
class Settings:
    checkpoint: Path
    budget: int
    second_budget: int
    work: Path
    configurations: int = 4
    ray_address: str | None = None  # an existing Ray (else the profiler starts a local one)
    texts: int = 1  # profiling texts per domain (decoder LMs) ...
    tokens: int = 64  # ... of this many tokens
    pairs: int = 4  # code/summary pairs (encoder-decoder)
    device_repeats: int = 2
    sweep_tokens: int = 16
    stream_tokens: int = 48
    change_after: int = 4  # tokens streamed before the budget changes
    timeout: float = 3600.0  # for each wait (the first start builds the expert store)

    @property
    def config(self) -> dict:
        return json.loads((self.checkpoint / "config.json").read_text())

    @property
    def checkpoint_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.checkpoint.glob("*.safetensors"))

    @property
    def max_context(self) -> int:
        """The context ``benchmarks.scale`` serves with, so the plans searched here fit its runs."""
        return context(self.checkpoint)


class Scenario:
    STEPS = ("start", "device_profile", "accuracy_profile", "searched_plan", "budget_change", "restart", "gateway")

    def __init__(self, settings: Settings):
        self.s = settings
        self.logs = settings.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.planner: Service | None = None
        self.executor: Service | None = None
        self.openai: Service | None = None  # the OpenAI-compatible gateway
        self.steps: list[Step] = []
        self.plans: dict[str, dict] = {}
        self.profile_written = 0.0  # time.time() of the accuracy profile's E_accuracy file
        self._stubs: dict[tuple, object] = {}

    # --- processes ------------------------------------------------------------------------
    def _start_planner(self, port: int = 0, name: str = "planner") -> None:
        self._serve("planner", name, ["planner", "serve", "--port", str(port), "--state-dir",
                                      str(self.s.work / "planner"), "--profiles", str(self.s.work / "profiles")])

    def _start_executor(self, budget: int, port: int = 0, name: str = "executor") -> None:
        self._serve("executor", name, [
            "executor", "serve", "--model", str(self.s.checkpoint), "--budget", str(budget), "--port", str(port),
            "--planner", self.planner.address, "--node-id", NODE, "--state-dir", str(self.s.work / "executor"),
            "--max-batch", "1", "--max-context", str(self.s.max_context), "--drain-seconds", "5",
        ])

    def _serve(self, role: str, name: str, args: list[str]) -> None:
        """``swapmoe *args`` as this scenario's ``role``, kept before it listens so ``close`` stops it
        even when interrupted while it starts; returns once it listens."""
        service = launch(name, args, self.logs)
        setattr(self, role, service)
        service.wait_listening(self.s.timeout)

    def close(self) -> None:
        for service in (self.openai, self.executor, self.planner):
            if service is not None:
                service.stop()

    # --- calls --------------------------------------------------------------------------------
    def estub(self) -> executor_pb2_grpc.ExecutorServiceStub:
        """A stub on the executor's address (a restart keeps the port; the channel reconnects)."""
        return self._stub(executor_pb2_grpc.ExecutorServiceStub, self.executor.address)

    def _stub(self, kind, address: str):
        if (kind, address) not in self._stubs:
            self._stubs[(kind, address)] = kind(transport.channel(address))
        return self._stubs[(kind, address)]

    def describe(self) -> epb.DescribeResponse:
        return self.estub().Describe(epb.DescribeRequest(), timeout=30)

    def status(self) -> ppb.ExecutorStatus:
        """The planner's view of the executor; an empty status until it registers (or while the
        planner restarts)."""
        stub = self._stub(planner_pb2_grpc.PlannerServiceStub, self.planner.address)
        try:
            return stub.GetPlanStatus(ppb.PlanStatusRequest(node_ids=[NODE]), timeout=30).executors[0]
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            return ppb.ExecutorStatus()

    def acked(self):
        """The executor's Describe once the planner has registered it and it runs, ACKed, the plan
        the planner wants (the same experts too: a plan the executor shrank keeps its version); else None."""
        described, status = self.describe(), self.status()
        return described if (status.connected and status.state == ppb.PLAN_STATE_ACKED
                             and status.acked_plan.version == described.plan.version
                             and status.acked_plan.experts_per_layer == described.plan.experts_per_layer) else None

    def planned(self, budget: int, exact: bool = False):
        """The executor's Describe once it runs, ACKed, the plan the planner searched for ``budget``
        (with ``exact``: searched at exactly that budget, not a frontier's nearest point), sent or
        kept: the planner sends no plan that would change nothing, so a search that chose what
        runs leaves the plan (and its origin) as it was; else None."""
        described, status = self.acked(), self.status()
        if described is None or status.budget_bytes != budget or not status.HasField("predicted"):
            return None
        return described if not exact or status.predicted.budget_bytes == budget else None

    def _plan_for(self, budget: int, plan) -> dict:
        """``plan`` as the plan for ``budget``; its origin says so when it was kept from another budget."""
        kept = f"budget={format_size(budget)} " not in plan.origin
        body = plan_json(plan)
        body["origin"] += f" (kept for {format_size(budget)}: its search chose the same plan)" if kept else ""
        return body

    def _wait(self, condition, what: str):
        try:
            return wait(condition, timeout=self.s.timeout, step=0.1)
        except TimeoutError:
            raise TimeoutError(f"no {what} within {self.s.timeout:g} s") from None

    # --- steps ----------------------------------------------------------------------------------
    def start(self, step: Step) -> None:
        began = time.monotonic()
        self._start_planner()
        step.figures["planner_start_s"] = time.monotonic() - began
        began = time.monotonic()
        self._start_executor(self.s.budget)
        step.figures["executor_start_s"] = time.monotonic() - began
        step.figures["store_built"] = any("building the expert store" in line for line in self.executor.output)
        described = self._wait(self.acked, "plan ACKed after the executor registered")
        step.figures["to_first_plan_acked_s"] = time.monotonic() - began
        step.figures.update(memory_figures(described), plan=plan_json(described.plan),
                            executor_rss=psutil.Process(self.executor.process.pid).memory_info().rss)
        step.checks["executor connected, planner's plan ACKed"] = True
        step.checks["accounted within budget"] = described.memory.accounted_bytes <= described.budget_bytes

    def device_profile(self, step: Step) -> None:
        from swapmoe.profiler.report import load_device

        root = self.s.work / "planner" / "profiles"  # where the planner keeps (and looks up) device profiles
        output = parts.run_logged(["profile", "device", "--planner", self.planner.address, "--node-id", NODE,
                                   "--root", str(root), "--repeats", str(self.s.device_repeats),
                                   "--sweep-tokens", str(self.s.sweep_tokens)], self.logs / "profile-device.log",
                                  self.s.timeout)
        directory = Path(output.strip().splitlines()[-1].removeprefix("profile: "))
        profile = load_device(directory)
        step.figures.update(directory=str(directory), decode_step_ms=profile.decode_step_ns / 1e6,
                            inflection_update_frequency=profile.inflection_update_frequency)
        step.checks["device profile stored for the node"] = profile.node_id == NODE

    def accuracy_profile(self, step: Step) -> None:
        args = ["profile", "accuracy", "--model", str(self.s.checkpoint), "--workers", "2",
                "--configurations", str(self.s.configurations), "--root", str(self.s.work / "profiles")]
        args += ["--pairs", str(self.s.pairs)] if self.s.config.get("is_encoder_decoder") else \
            ["--texts", str(self.s.texts), "--tokens", str(self.s.tokens)]
        if self.s.ray_address:
            args += ["--ray-address", self.s.ray_address]
        help_text = parts.run_logged(["profile", "accuracy", "--help"], self.logs / "profile-accuracy-help.log", 60)
        step.figures["max_resident"] = "--max-resident" in help_text  # the flag is new: used where it exists
        if step.figures["max_resident"]:
            args += ["--max-resident", str(self.s.budget)]
        elif 2 * self.s.checkpoint_bytes > psutil.virtual_memory().available:
            raise RuntimeError(f"`swapmoe profile accuracy` has no --max-resident here, and each of its two workers "
                               f"would hold the whole {format_size(self.s.checkpoint_bytes)} model")
        run = parts.run_sampled(args, self.logs / "profile-accuracy.log", self.s.timeout, self.s.ray_address)
        directory = Path(run.output.strip().splitlines()[-1].removeprefix("profile: "))
        self.profile_written = (directory / "e_accuracy.json").stat().st_mtime  # wall clock, as time.time()
        step.figures.update(directory=str(directory), workers_peak_rss=run.peak.workers, tree_peak_rss=run.peak.tree,
                            workers_seen=run.peak.worker_count, rss_samples=run.peak.samples)
        step.checks["E_accuracy written"] = (directory / "e_accuracy.json").is_file()
        step.checks["two scoring workers ran"] = run.peak.worker_count == 2
        left = run.peak.survivors(timeout=30)
        step.figures["left_running"] = left
        step.checks["nothing of the run left running (workers, a local Ray)"] = not left

    def searched_plan(self, step: Step) -> None:
        """The planner looks for new profiles every few seconds for connected executors whose
        model has none (``PlanPolicy.revisit``): the executor is planned for without reconnecting."""
        described = self._wait(lambda: self.planned(self.s.budget), "searched plan ACKed")
        step.figures["profile_to_acked_s"] = time.time() - self.profile_written
        step.figures["first_plan"] = plan_json(described.plan)
        described = self._wait(lambda: self.planned(self.s.budget, exact=True), "search at the exact budget")
        step.figures["profile_to_exact_budget_s"] = time.time() - self.profile_written
        step.figures.update(memory_figures(described), plan=self._plan_for(self.s.budget, described.plan),
                            profile_state=self.status().profile_state)
        self.plans[str(self.s.budget)] = step.figures["plan"]
        step.checks["searched plan ACKed"] = True
        step.checks["accounted within budget"] = described.memory.accounted_bytes <= self.s.budget

    def budget_change(self, step: Step) -> None:
        stub, budget = self.estub(), self.s.second_budget
        change = lambda: stub.SetBudget(epb.SetBudgetRequest(budget_bytes=budget, reason="scale_system"),  # noqa: E731
                                        timeout=60)
        version = self.describe().plan.version
        stream = parts.stream_with_change(stub, PROMPT, self.s.stream_tokens, self.s.change_after, change,
                                          self.s.timeout)
        described = self.describe()
        achieved = list(stream.change_result.achieved_experts_per_layer) if stream.change_result else []
        step.figures.update(set_budget_s=stream.change_seconds, changed_after_tokens=stream.change_after,
                            achieved_after_set_budget=achieved,
                            stream_tokens=stream.tokens, usage_tokens=stream.usage_tokens,
                            finish_reason=stream.finish_reason, stream_s=stream.seconds, **memory_figures(described))
        step.checks["SetBudget made mid-stream"] = 0 < stream.change_after < stream.usage_tokens
        step.checks["SetBudget under 1 s"] = 0 < stream.change_seconds < 1.0
        step.checks["stream complete, no token lost"] = stream.complete
        step.checks["new budget in force, accounted within it"] = (
            described.budget_bytes == budget and described.memory.accounted_bytes <= budget)
        described = self._wait(lambda: self.planned(budget), "the planner's plan for the new budget ACKed")
        step.figures["change_to_replan_acked_s"] = time.monotonic() - stream.change_started
        described = self._wait(lambda: self.planned(budget, exact=True), "search at the new exact budget")
        step.figures["change_to_exact_budget_s"] = time.monotonic() - stream.change_started
        step.figures.update(plan=self._plan_for(budget, described.plan), new_plan_sent=described.plan.version > version)
        self.plans[str(budget)] = step.figures["plan"]
        step.checks["planner's plan for the new budget ACKed, within it"] = described.memory.accounted_bytes <= budget

    def restart(self, step: Step) -> None:
        before = self.describe().plan
        saved = json_format.Parse((self.s.work / "executor" / "plan.json").read_text(), common_pb2.Plan())
        port = int(self.executor.address.rsplit(":", 1)[1])
        began = time.monotonic()
        step.figures["exit_code"] = self.executor.stop()
        step.figures["stop_s"] = time.monotonic() - began
        began = time.monotonic()
        self._start_executor(self.s.second_budget, port, "executor-restarted")
        step.figures["to_serving_s"] = time.monotonic() - began
        first = self.describe().plan
        step.figures.update(saved=plan_json(saved), resumed=plan_json(first),
                            executor_rss=psutil.Process(self.executor.process.pid).memory_info().rss)
        self._wait(lambda: self.planned(self.s.second_budget), "the planner's plan ACKed after the restart")
        step.figures["to_reconnected_s"] = time.monotonic() - began
        resumed = first.version == saved.version and list(first.experts_per_layer) == list(saved.experts_per_layer)
        if first.version > saved.version:  # a newer plan beat the first Describe: the planner says why it sent one
            resumed = "running no planner's plan" not in self.status().reason
        step.checks["saved plan is the one running before"] = saved.version == before.version
        step.checks["restart resumed the saved planner's plan"] = resumed and saved.origin.startswith("planner:")

    def gateway(self, step: Step) -> None:
        began = time.monotonic()  # completions need no --tokenizer (chat would; these checkpoints have no template)
        self._serve("openai", "gateway", ["http", "serve", "--executor", self.executor.address, "--port", "0",
                                          "--model-name", self.s.checkpoint.name])
        step.figures["gateway_start_s"] = time.monotonic() - began
        answer = parts.gateway_completion(self.openai.address, PROMPT, 16, self.s.timeout)
        step.figures.update({k: v for k, v in answer.items() if k != "text"})
        step.checks["gateway answered a streamed completion"] = answer["status"] == 200 and answer["chunks"] > 0 \
            and answer["done"] and answer["ttft_s"] is not None

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> list[Step]:
        """Every step in order, timed; stops at the first step that raises, and stops every process."""
        try:
            with tqdm(self.STEPS, desc="scale system", unit="step") as bar:
                for name in bar:
                    bar.set_postfix_str(name)
                    step = Step(name)
                    self.steps.append(step)
                    began = time.monotonic()
                    try:
                        getattr(self, name)(step)
                    except Exception as error:  # noqa: BLE001 - recorded, the report says which step failed
                        step.error = f"{type(error).__name__}: {error}"[:2000]
                        break
                    finally:
                        step.seconds = time.monotonic() - began
        finally:
            self.close()
        return self.steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the checkpoint directory (python -m swapmoe.models.paper_scale)")
    parser.add_argument("--budget", type=parse_size, default=parse_size("4GiB"), help="the executor's budget (4GiB)")
    parser.add_argument("--second-budget", type=parse_size, default=parse_size("2GiB"),
                        help="the budget set while streaming (2GiB)")
    parser.add_argument("--configurations", type=int, default=4, help="accuracy profiling configurations (4)")
    parser.add_argument("--work", type=Path, default=None, help="state, profiles and logs (default: a new temp dir)")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: a local Ray)")
    parser.add_argument("--store-root", type=Path, default=None, help="where expert stores are built "
                        "(default $SWAPMOE_STORE_ROOT or ~/.cache/swapmoe/stores)")
    parser.add_argument("--texts", type=int, default=1, help="profiling texts per domain (decoder LMs; 1)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per profiling text (64)")
    parser.add_argument("--pairs", type=int, default=4, help="code/summary pairs (encoder-decoder; 4)")
    parser.add_argument("--device-repeats", type=int, default=2, help="repetitions per device measurement (2)")
    parser.add_argument("--sweep-tokens", type=int, default=16, help="tokens per update frequency of the sweep (16)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for each wait (3600)")
    parser.add_argument("--report", type=Path, default=REPORT, help="the Markdown report (a .json beside it)")
    parser.add_argument("--plans-out", type=Path, default=HERE / "results" / "RESULTS-scale-system-plans.json",
                        help="the searched plans by budget, for `benchmarks.scale --plans`")
    args = parser.parse_args(argv)
    if args.store_root:
        os.environ["SWAPMOE_STORE_ROOT"] = str(args.store_root)  # the executor and the Ray workers inherit it
    work = args.work or Path(tempfile.mkdtemp(prefix="swapmoe-scale-system-"))
    settings = Settings(args.checkpoint.resolve(), args.budget, args.second_budget, work, args.configurations,
                        args.ray_address, args.texts, args.tokens, args.pairs, args.device_repeats, args.sweep_tokens,
                        timeout=args.timeout)
    scenario = Scenario(settings)
    steps = scenario.run()
    return write(settings, Scenario.STEPS, steps, scenario.plans, args.report, args.plans_out, argv)


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the processes this run started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = main()
    raise SystemExit(0 if result["passed"] else 1)
