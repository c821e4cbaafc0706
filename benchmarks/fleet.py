"""Issue 15's fleet goals measured side by side: a planner holding 1,000 and 10,000 executors
(``swapmoe.simulation.fleet``), fleet-wide and staged rollouts through the control node, two planners
under one control node, and what TLS costs a Generate stream.

    python -m benchmarks.fleet      # ~4 min; writes benchmarks/results/RESULTS-fleet.md and .json
    python -m benchmarks.fleet --sizes 1000 --skip-sharded --skip-tls --report /tmp/fleet.md

Every server is a process of its own (``swapmoe ... serve``), and so is each simulated fleet;
this process only watches: ``/proc`` for the planner's memory, threads and CPU, a
``grpc.health.v1`` Check every 50 ms for its responsiveness, the simulators' status lines (every
0.2 s) for what the executors saw, and ``GetRollout`` (summary only, every 100 ms) for what the
control node reports. ``fleet_report`` turns the figures into the report.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.fleet_report import machine, render
from benchmarks.fleet_watch import STATUS_EVERY_S, TELEMETRY_S, HealthProbe, Sim, proc_sample, spawn_planner
from swapmoe.core.plan import DEFAULT_UPDATE_FREQUENCY
from swapmoe.orchestration.processes import spawn
from swapmoe.rpc import transport
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb, fleet_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPORT = HERE / "results" / "RESULTS-fleet.md"
POLL_S = 0.1  # GetRollout, summary only
ROLLOUT_TIMEOUT_MS = 120_000  # per wave: generous, so a slow wave shows as slow, not as unreachable
# The pinned plan every rollout carries: 4 of the bundled LM's 16 experts in each of its 6 layers.
PLAN = common_pb2.Plan(experts_per_layer=[4] * 6, update_frequency=DEFAULT_UPDATE_FREQUENCY,
                       origin="benchmarks.fleet")
NEW_TOKENS = 64  # per Generate in the TLS section, greedy
FINAL = (fpb.ROLLOUT_STATE_SUCCEEDED, fpb.ROLLOUT_STATE_FAILED, fpb.ROLLOUT_STATE_ABORTED)


def register(sims: list[Sim], probe: HealthProbe, pids: list[int], timeout: float) -> dict:
    """From the simulators' start to every node connected (the time, connect errors, reconnects)
    and to every node's first plan ACKed; the planners' CPU seconds until then."""
    launched, cpu0 = min(s.launched for s in sims), sum(proc_sample(p)["cpu_s"] for p in pids)
    reached = [s.first(lambda st, n=s.count: st["connected"] >= n, timeout=timeout) for s in sims]
    done = max(t for t, _ in reached)
    try:  # a fresh planner sends each executor a first plan
        planned = max(s.first(lambda st, n=s.count: st["acked"] >= n and not st["pending"], timeout=60)[0]
                      for s in sims)
    except TimeoutError:
        planned = None
    every = max(1, round(1 / STATUS_EVERY_S))  # about one line a second
    return {"seconds": done - launched, "planned_s": planned and planned - launched,
            "planner_cpu_s": sum(proc_sample(p)["cpu_s"] for p in pids) - cpu0,
            "errors": sum(st["errors"] for _, st in reached),
            "codes": ",".join(st["codes"] for _, st in reached if st.get("codes")),
            "reconnects": sum(st["reconnects"] for _, st in reached), "health": probe.window(launched, done),
            "timeline": [(round(t - launched, 2), st["connected"], st["acked"], st["errors"]) for s in sims
                         for t, st in s.history[::every] if t <= (planned or done)]}


def idle(pid: int, sims: list[Sim], probe: HealthProbe, seconds: float) -> dict:
    """The planner's RSS, threads and CPU share, and health latency, over an idle window."""
    t0, first, s0 = time.monotonic(), proc_sample(pid), [s.latest for s in sims]
    sim0 = [proc_sample(s.process.pid)["cpu_s"] for s in sims]
    samples = [first]
    while time.monotonic() < t0 + seconds:
        time.sleep(1.0)
        samples.append(proc_sample(pid))
    t1, s1 = time.monotonic(), [s.latest for s in sims]
    wall = t1 - t0
    sim1 = [proc_sample(s.process.pid)["cpu_s"] for s in sims]
    return {"seconds": wall, "cpu_cores": (samples[-1]["cpu_s"] - first["cpu_s"]) / wall,
            "rss_bytes": samples[-1]["rss_bytes"], "rss_max_bytes": max(s["rss_bytes"] for s in samples),
            "threads": samples[-1]["threads"], "threads_max": max(s["threads"] for s in samples),
            "telemetry_per_s": sum(b["telemetry"] - a["telemetry"] for a, b in zip(s0, s1)) / wall,
            "reconnects": sum(b["reconnects"] - a["reconnects"] for a, b in zip(s0, s1)),
            "connected_min": int(min(st["connected"] for s in sims for t, st in s.history if t0 <= t <= t1)),
            "sim_cpu_cores": sum(b - a for a, b in zip(sim0, sim1)) / wall, "health": probe.window(t0, t1)}


def roll(stub, sims: list[Sim], probe: HealthProbe, pids: dict[str, int], **fields) -> dict:
    """One rollout of ``PLAN`` through the control node, watched until it ends: the time to its
    final state (as GetRollout reports it) and to every simulated node's ACK (as they saw it)."""
    request = fpb.StartRolloutRequest(plan=PLAN, timeout_ms=ROLLOUT_TIMEOUT_MS, description="benchmarks.fleet",
                                      **fields)
    base, cpu0 = [s.latest["acked"] for s in sims], {k: proc_sample(p)["cpu_s"] for k, p in pids.items()}
    t0 = time.monotonic()
    rollout = stub.StartRollout(request, timeout=120)
    answered, progress = time.monotonic(), []
    while rollout.state not in FINAL and time.monotonic() < t0 + 300:
        time.sleep(POLL_S)
        rollout = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=rollout.rollout_id, summary_only=True), timeout=30)
        progress.append((round(time.monotonic() - t0, 2), rollout.wave, rollout.acked, rollout.pending))
    done = time.monotonic()
    acked = _all_acked(sims, base, t0)
    return {"rollout_id": rollout.rollout_id, "state": fpb.RolloutState.Name(rollout.state),
            "message": rollout.message, "targeted": rollout.targeted, "acked": rollout.acked,
            "nacked": rollout.nacked, "unreachable": rollout.unreachable, "waves": rollout.waves,
            "start_rpc_s": answered - t0, "final_s": done - t0, "all_acked_s": acked and acked - t0,
            "health": probe.window(t0, done), "progress": progress,
            "cpu_s": {k: proc_sample(p)["cpu_s"] - cpu0[k] for k, p in pids.items()}}


def push(planner: str, sim: Sim, probe: HealthProbe) -> dict:
    """``PlannerService.PushPlan`` of ``PLAN`` to every connected executor, straight to the planner:
    the floor under a rollout through the control node."""
    stub = planner_pb2_grpc.PlannerServiceStub(channel := transport.channel(planner))
    base, t0 = sim.latest["acked"], time.monotonic()
    try:
        answer = stub.PushPlan(ppb.PushPlanRequest(plan=PLAN, view=ppb.STATUS_VIEW_BRIEF), timeout=120)
        answered = time.monotonic()
    finally:
        channel.close()
    acked = _all_acked([sim], [base], t0)
    done = acked or time.monotonic()
    return {"targeted": len(answer.executors), "push_rpc_s": answered - t0, "all_acked_s": acked and acked - t0,
            "health": probe.window(t0, done)}


def _all_acked(sims: list[Sim], base: list[float], t0: float, timeout: float = 60.0) -> float | None:
    """When every simulator had counted one more ACK per node than at ``base`` (None: never)."""
    try:
        return max(s.first(lambda st, b=b, n=s.count: st["acked"] >= b + n, after=t0, timeout=timeout)[0]
                   for s, b in zip(sims, base))
    except TimeoutError:
        return None


def one_planner(n: int, args, work: Path, reference: HealthProbe) -> dict:
    """Sections 1 and 2 at one fleet size: registration, idle, then rollouts."""
    planner, planner_control = spawn_planner(f"planner-{n}", work, "--max-executors", str(max(n, 20_000)))
    before = proc_sample(planner.process.pid)
    probe = HealthProbe(planner_control, reference, HealthProbe(planner.address)).start()
    sim, control, result = None, None, {"n": n}
    try:
        sim = Sim(planner.address, n, ramp_for(n, args), log_dir=work)
        result["ramp_s"] = ramp_for(n, args)
        result["registration"] = register([sim], probe, [planner.process.pid], timeout=240)
        time.sleep(2.0)
        result["rss_before_bytes"] = before["rss_bytes"]
        result["idle"] = idle(planner.process.pid, [sim], probe, args.idle)
        print(f"N={n}: registered in {result['registration']['seconds']:.1f} s; idle planner "
              f"{result['idle']['cpu_cores']:.3f} cores, {result['idle']['rss_bytes'] / 2**20:.0f} MiB", flush=True)
        if not args.skip_rollouts:
            result["push"] = push(planner_control, sim, probe)
            control = spawn(f"fleet-{n}", ["fleet", "serve", "--planner", planner_control, "--port", "0"],
                            log_dir=work)
            pids = {"planner": planner.process.pid, "control": control.process.pid}
            with transport.channel(control.address) as channel:
                stub = fleet_pb2_grpc.FleetServiceStub(channel)
                result["fleet_wide"] = roll(stub, [sim], probe, pids, canary_nodes=0, wave_percents=[100])
                print(f"N={n}: fleet-wide rollout {result['fleet_wide']['state']} in "
                      f"{result['fleet_wide']['final_s']:.2f} s", flush=True)
                if n in args.staged:
                    result["staged"] = roll(stub, [sim], probe, pids)
    finally:
        probe.stop()
        result["sim_errors"] = sim.stop() if sim else []
        for service in (control, planner):
            if service is not None:
                service.stop()
    return result


def two_planners(n: int, args, work: Path, reference: HealthProbe) -> dict:
    """Section 3: two planners, each with its own simulated shard, one control node."""
    started = [spawn_planner(f"planner-shard-{i}", work) for i in range(2)]
    planners = [p for p, _ in started]
    probe = HealthProbe(started[0][1], reference, HealthProbe(planners[0].address)).start()
    sims, control, result = [], None, {"n_each": n}
    try:
        sims = [Sim(p.address, n, ramp_for(n, args), start=i * n, log_dir=work) for i, p in enumerate(planners)]
        result["registration"] = register(sims, probe, [p.process.pid for p in planners], timeout=240)
        control = spawn("fleet-sharded", ["fleet", "serve", "--port", "0",
                                          *[a for _, c in started for a in ("--planner", c)]], log_dir=work)
        pids = {"planner-0": planners[0].process.pid, "planner-1": planners[1].process.pid,
                "control": control.process.pid}
        with transport.channel(control.address) as channel:
            stub = fleet_pb2_grpc.FleetServiceStub(channel)
            result["fleet_wide"] = roll(stub, sims, probe, pids, canary_nodes=0, wave_percents=[100])
        print(f"2 planners x {n}: rollout {result['fleet_wide']['state']} in {result['fleet_wide']['final_s']:.2f} s",
              flush=True)
    finally:
        probe.stop()
        result["sim_errors"] = [line for sim in sims for line in sim.stop()]
        for service in (control, *planners):
            if service is not None:
                service.stop()
    return result


def tls_cost(rounds: int, work: Path) -> dict:
    """Section 4: Generate on the bundled LM at one client, plaintext against TLS + mutual TLS + a
    token (``--security``), two executors side by side, runs alternating which goes first; and
    the first call on a fresh channel (connection and handshake)."""
    from swapmoe.models.bundled import LM_DIR
    from swapmoe.models.corpus import DOMAINS, load_eval
    from swapmoe.cli.devcerts import make_dev_certs
    from swapmoe.rpc import security
    from swapmoe.v1 import executor_pb2_grpc

    make_dev_certs(work / "certs")
    serve = ["executor", "serve", "--model", str(LM_DIR), "--budget", "1GiB", "--port", "0"]
    executors = {"plaintext": spawn("executor-plain", serve, log_dir=work),
                 "TLS": spawn("executor-tls", [*serve, "--security", str(work / "certs")], log_dir=work)}
    clients = {"plaintext": None,
               "TLS": security.client_from_args(argparse.Namespace(security=work / "certs"), "client")}
    prompts = [row["text"][:200] for domain in DOMAINS for row in load_eval(domain)[:4]]
    runs, connects = {name: [] for name in executors}, {name: [] for name in executors}
    channels = {name: transport.channel(e.address, clients[name]) for name, e in executors.items()}
    try:
        stubs = {name: executor_pb2_grpc.ExecutorServiceStub(c) for name, c in channels.items()}
        for stub in stubs.values():
            _generate(stub, prompts[0])  # warm-up
        for r in range(rounds):
            order = list(stubs) if r % 2 == 0 else list(reversed(stubs))
            for name in order:
                runs[name].append(_generate(stubs[name], prompts[r % len(prompts)]))
            for name in order:
                connects[name].append(_first_call(executors[name].address, clients[name]))
        print(f"TLS: {rounds} rounds done", flush=True)
    finally:
        for name, executor in executors.items():
            channels[name].close()
            executor.stop()
    return {"rounds": rounds, "new_tokens": NEW_TOKENS, "runs": runs, "first_call_ms": connects}


def _generate(stub, prompt: str) -> dict:
    from swapmoe.v1 import executor_pb2 as epb

    began, first, tokens = time.perf_counter(), None, 0
    for chunk in stub.Generate(epb.GenerateRequest(text=prompt, max_new_tokens=NEW_TOKENS), timeout=300):
        first = first or time.perf_counter()
        tokens += len(chunk.token_ids)
    return {"tokens": tokens, "seconds": time.perf_counter() - began, "ttft_ms": (first - began) * 1e3}


def _first_call(address: str, client) -> float:
    """Milliseconds from a new channel to its first answer (a health Check)."""
    began = time.perf_counter()
    with transport.channel(address, client) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return (time.perf_counter() - began) * 1e3


def ramp_for(n: int, args) -> float:
    return args.ramp if args.ramp is not None else round(n / 1000, 1)


def collector(n: int, work: Path) -> dict:
    """Section 5: what CPython's full collection costs a planner holding ``n`` executors, before and
    after the heap keeper froze them, and what it finds once they have all left (cycles the
    frozen heap would have kept). The planner runs in this process, so its heap is measurable."""
    from swapmoe.planner_service.heap import HeapKeeper, HeapSettings
    from swapmoe.planner_service.policy import PlannerSettings
    from swapmoe.planner_service.server import serve

    server, registry = serve("127.0.0.1:0", settings=PlannerSettings(profile_devices=False))
    keeper, sim = HeapKeeper(HeapSettings(freeze_every_s=3600.0)), None
    try:
        sim = Sim(f"127.0.0.1:{server.port}", n, round(n / 1000, 1), log_dir=work)
        sim.first(lambda st: st["connected"] >= n and st["acked"] >= n, timeout=120)
        time.sleep(TELEMETRY_S)  # a round of telemetry, as an idle fleet sends
        started = time.perf_counter()
        gc.collect()
        walk_s, tracked = time.perf_counter() - started, len(gc.get_objects())
        gc.freeze()
        started = time.perf_counter()
        gc.collect()
        frozen_walk_s = time.perf_counter() - started
        sim.stop()
        sim = None
        deadline = time.monotonic() + 60
        while any(r.connected for r in registry.find([])) and time.monotonic() < deadline:
            time.sleep(0.2)
        return {"n": n, "tracked": tracked, "full_walk_s": walk_s, "frozen_walk_s": frozen_walk_s,
                "found_after_leaving": keeper.full_collection()}
    finally:
        if sim is not None:
            sim.stop()
        gc.unfreeze()
        server.stop(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[1000, 10_000], help="fleet sizes on one planner")
    parser.add_argument("--ramp", type=float, help="seconds to spread registrations over (default: N/1000)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle window (default 30)")
    parser.add_argument("--staged", type=ints, default=[1000], help="sizes that also get a staged rollout")
    parser.add_argument("--sharded", type=int, default=1000, help="executors per planner with two planners")
    parser.add_argument("--tls-rounds", type=int, default=20, help="Generate runs per path (default 20)")
    parser.add_argument("--skip-rollouts", action="store_true")
    parser.add_argument("--skip-sharded", action="store_true")
    parser.add_argument("--skip-tls", action="store_true")
    parser.add_argument("--collector", type=int, default=2000, help="executors in the collector section (0: skip)")
    parser.add_argument("--report", type=Path, default=REPORT, help="the Markdown report (the JSON goes next to it)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    print(f"logs in {work}", flush=True)
    idle_planner = spawn("planner-reference", ["planner", "serve", "--port", "0", "--no-device-profiling"],
                         log_dir=work)
    reference = HealthProbe(idle_planner.address).start()
    try:
        results = {"machine": machine(), "argv": sys.argv[1:], "plan": list(PLAN.experts_per_layer),
                   "telemetry_interval_s": TELEMETRY_S,
                   "sizes": [one_planner(n, args, work, reference) for n in args.sizes]}
        if not args.skip_sharded:
            results["sharded"] = two_planners(args.sharded, args, work, reference)
    finally:
        reference.stop()
        idle_planner.stop()
    if not args.skip_tls:
        results["tls"] = tls_cost(args.tls_rounds, work)
    if args.collector:
        results["collector"] = collector(args.collector, work)
    report = render(results)
    print(report)
    args.report.write_text(report)
    args.report.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.report} and {args.report.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
