"""A simulated fleet: thousands of executors on the real PlannerService.Connect protocol, in one
process, for loading a planner (issue 15: a planner holding 10,000 executors).

    python -m swapmoe.simulation.fleet --planner HOST:PORT --count 1000 [--labels class=a,region=eu ...]
        [--nack-ids sim-00003,sim-00007] [--nack-share 0.2] [--token-file F] [--telemetry-interval S]

runs until SIGINT or SIGTERM and prints a status line every ``--status-every`` seconds::

    fleet-sim t=12.0 connected=1000/1000 plans=1000 acked=800 nacked=200 pending=0 reconnects=0 errors=0 telemetry=30000 cpu=4.1

(``connected``: streams open now, past their Welcome, of the fleet's nodes; ``plans``, ``acked``,
``nacked``: plans received and answers sent, in all; ``pending``: nodes holding a plan they
have not answered; ``reconnects``: Welcomes after a node's first; ``errors``: streams that
ended with an error status, and ``codes`` by status code when there are any; ``cpu``: CPU
seconds this process used.) The last line starts ``fleet-sim stopped``. ``parse_status`` reads
a line back into a dict. Before it, one ``fleet-sim error CODE ...`` line per status code
that ended streams, with one node's error message.

In a test or a benchmark, ``SimulatedFleet(SimSettings(...)).start()`` runs the fleet's asyncio
loop on a background thread; ``wait_connected``, ``wait_acked``, ``stats`` and ``records`` watch
it, ``set_nack`` changes who rejects plans. Each node is ``node.SimNode``; node ids
are ``prefix`` + zero-padded index (``sim-00000``, ``sim-00001``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Collection

import grpc

from swapmoe.core.sizes import parse_size
from swapmoe.simulation.node import (DEFAULT_LABELS, SIM_CHANNEL_OPTIONS, Fleetwide, NodeRecord, SimNode,
                                    SimSettings)
from swapmoe.v1 import planner_pb2_grpc

__all__ = ["SIM_CHANNEL_OPTIONS", "NodeRecord", "SimSettings", "SimulatedFleet", "every_share", "parse_status",
           "status_line"]


class SimulatedFleet:
    """``settings.count`` simulated executors on a loop of their own (a background thread)."""

    def __init__(self, settings: SimSettings):
        self.settings = settings
        self.shared = Fleetwide(settings)
        self.nodes = [SimNode(i, self.shared) for i in range(settings.count)]
        self._by_id = {node.node_id: node for node in self.nodes}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fleet-sim")
        self._started = time.monotonic()
        self._cpu = time.process_time()

    def start(self) -> "SimulatedFleet":
        self._started, self._cpu = time.monotonic(), time.process_time()
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End every stream and close the channels."""
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout)

    def __enter__(self) -> "SimulatedFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_nack(self, nack: Collection[str] | Callable[[str], bool]) -> None:
        """From now on these node ids (or those the predicate picks) NACK every plan."""
        self.shared.nack = nack if callable(nack) else frozenset(nack)

    def record(self, node_id: str) -> NodeRecord:
        return self._by_id[node_id].record

    def records(self) -> list[NodeRecord]:
        return [node.record for node in self.nodes]

    def node_ids(self) -> list[str]:
        return [node.node_id for node in self.nodes]

    def stats(self) -> dict:
        """The fleet's counters now, and the CPU seconds this process used since ``start``."""
        c = self.shared.counters
        return {"nodes": len(self.nodes), "connected": c.connected, "streams": c.streams,
                "reconnects": c.reconnects, "plans": c.plans, "acked": c.acks, "nacked": c.nacks,
                "pending": sum(node.record.pending for node in self.nodes), "budget_changes": c.budget_changes,
                "telemetry": c.telemetry, "telemetry_dropped": c.telemetry_dropped, "profile_asks": c.profile_asks,
                "errors": _copy(c.errors), "uptime_s": time.monotonic() - self._started,
                "cpu_s": time.process_time() - self._cpu}

    def wait_connected(self, n: int | None = None, timeout: float = 30.0) -> dict:
        """Wait until ``n`` nodes (all, by default) have an open stream; the stats, or TimeoutError."""
        n = len(self.nodes) if n is None else n
        return self._wait(lambda: self.shared.counters.connected >= n, timeout, f"{n} nodes connected")

    def wait_acked(self, target: int | Callable[[NodeRecord], bool] = 1, timeout: float = 30.0,
                   node_ids: Collection[str] | None = None) -> dict:
        """Wait until every node named (by default: every node that does not NACK now) has ACKed a
        plan of version ``target`` or newer, or satisfies ``target(record)``."""
        done = target if callable(target) else (lambda record: record.acked_version >= target)
        if node_ids is None:
            node_ids = [n for n in self._by_id if not self.shared.nacks(n)]
        records = [self.record(n) for n in node_ids]
        return self._wait(lambda: all(done(r) for r in records), timeout, f"{len(records)} nodes acked")

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fleet-sim: timed out after {timeout:g} s waiting for {what}: "
                                   f"{status_line(self.stats())}")
            time.sleep(0.05)
        return self.stats()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        make = self.settings.channel_factory or _insecure_channel
        channels = [make(self.settings.planner) for _ in range(self.settings.channel_count)]
        stubs = [planner_pb2_grpc.PlannerServiceStub(channel) for channel in channels]
        tasks = [asyncio.ensure_future(node.run(stubs[i % len(stubs)])) for i, node in enumerate(self.nodes)]
        self._ready.set()
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)


def _copy(counter) -> dict:
    """A copy of a dict the loop's thread may be adding to."""
    while True:
        try:
            return dict(counter)
        except RuntimeError:  # changed size during the copy
            continue


def _insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=SIM_CHANNEL_OPTIONS)


def every_share(node_ids: list[str], share: float) -> set[str]:
    """``round(share * len(node_ids))`` of the ids, spread evenly (deterministic: tests can name them)."""
    return {node_id for i, node_id in enumerate(node_ids) if int((i + 1) * share) > int(i * share)}


def status_line(stats: dict, prefix: str = "fleet-sim") -> str:
    codes = ",".join(f"{code}:{n}" for code, n in sorted(stats["errors"].items()))
    return (f"{prefix} t={stats['uptime_s']:.1f} connected={stats['connected']}/{stats['nodes']} "
            f"plans={stats['plans']} acked={stats['acked']} nacked={stats['nacked']} pending={stats['pending']} "
            f"reconnects={stats['reconnects']} errors={sum(stats['errors'].values())} "
            f"telemetry={stats['telemetry']} cpu={stats['cpu_s']:.1f}" + (f" codes={codes}" if codes else ""))


def parse_status(line: str) -> dict[str, float | str]:
    """A status line's ``key=value`` fields: numbers (``connected`` without its ``/nodes``), and
    ``codes`` (errors by status code, ``UNAVAILABLE:3,...``) as text."""
    fields = dict(term.split("=", 1) for term in line.split() if "=" in term)
    return {key: value if key == "codes" else float(value.split("/")[0]) for key, value in fields.items()}


def error_examples(records: list[NodeRecord]) -> list[str]:
    """One node's last error per status code, for the log: ``fleet-sim error CODE (n nodes) e.g. ID: details``."""
    by_code: dict[str, list[NodeRecord]] = {}
    for record in records:
        if record.last_error:
            by_code.setdefault(record.last_error.split(":", 1)[0], []).append(record)
    return [f"fleet-sim error {code} ({len(found)} nodes) e.g. {found[0].node_id}: {found[0].last_error}"
            for code, found in sorted(by_code.items())]


def _label_sets(terms: list[str] | None) -> tuple[dict[str, str], ...]:
    if not terms:
        return DEFAULT_LABELS
    sets = []
    for term in terms:
        pairs = [pair.partition("=") for pair in term.split(",") if pair.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise SystemExit(f"--labels {term!r}: expected key=value[,key=value...]")
        sets.append({key.strip(): value.strip() for key, _, value in pairs})
    return tuple(sets)


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    node_ids = [f"{args.prefix}{args.start + i:0{args.digits}d}" for i in range(args.count)]
    nack = set(filter(None, (n.strip() for n in args.nack_ids.split(",")))) | every_share(node_ids, args.nack_share)
    metadata = ()
    if args.token_file:
        metadata = (("authorization", f"Bearer {Path(args.token_file).read_text().strip()}"),)
    return SimSettings(args.planner, args.count, args.prefix, args.start, args.digits, labels=_label_sets(args.labels),
                       budget_bytes=parse_size(args.budget) if args.budget else 0,
                       model_fingerprint=args.fingerprint, telemetry_interval_s=args.telemetry_interval,
                       nack=frozenset(nack), ack_delay_s=args.ack_delay, connections=args.connections,
                       metadata=metadata, reconnect=not args.no_reconnect, ramp_s=args.ramp, seed=args.seed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swapmoe.simulation.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--planner", required=True, help="HOST:PORT of PlannerService")
    p.add_argument("--count", type=int, default=100, help="simulated executors (default 100)")
    p.add_argument("--prefix", default="sim-", help="node id prefix (default sim-)")
    p.add_argument("--start", type=int, default=0, help="first node index (default 0)")
    p.add_argument("--digits", type=int, default=5, help="zero-padded digits of the index (default 5)")
    p.add_argument("--labels", action="append", metavar="K=V[,K=V...]",
                   help="a label set; repeat for several, cycled over the nodes (default: class=a/b alternating, "
                        "region=eu/us every two)")
    p.add_argument("--nack-ids", default="", help="comma-separated node ids that NACK every plan")
    p.add_argument("--nack-share", type=float, default=0.0, help="this share of the nodes, spread evenly, NACKs too")
    p.add_argument("--token-file", help="sent as 'authorization: Bearer <token>' on every stream")
    p.add_argument("--telemetry-interval", type=float, default=None, metavar="S",
                   help="seconds between telemetry reports (default: what the planner's Welcome asks; 0: none)")
    p.add_argument("--ack-delay", type=float, default=0.0, metavar="S", help="seconds before answering a plan")
    p.add_argument("--budget", help="each node's budget, e.g. 20MiB (default: half of the experts)")
    p.add_argument("--fingerprint", default="f1ee700000000000", help="model fingerprint registered")
    p.add_argument("--connections", type=int, default=0, help="TCP connections to spread streams over "
                                                              "(default: one per 50 streams)")
    p.add_argument("--ramp", type=float, default=0.0, metavar="S", help="spread first registrations over S seconds")
    p.add_argument("--no-reconnect", action="store_true", help="do not register again when a stream ends")
    p.add_argument("--status-every", type=float, default=2.0, metavar="S", help="seconds between status lines")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet = SimulatedFleet(settings).start()
    ids = fleet.node_ids()
    print(f"fleet-sim started planner={settings.planner} nodes={ids[0]}..{ids[-1]} "
          f"connections={settings.channel_count} nack={len(settings.nack)}", flush=True)
    while not stop.wait(args.status_every):
        print(status_line(fleet.stats()), flush=True)
    fleet.stop()
    for line in error_examples(fleet.records()):
        print(line, flush=True)
    print(status_line(fleet.stats(), prefix="fleet-sim stopped"), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
