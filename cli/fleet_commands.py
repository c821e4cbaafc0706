"""``swapmoe fleet ...``: serve the control node, list the fleet, start and watch staged rollouts,
pause, resume and abort them.

Every client command talks to a control node (``--fleet``, default 127.0.0.1:50053; a bare host
dials port 50053), with the TLS and token flags the CLI adds to client commands; a failed call
is the CLI's one-line error (the address, the status and its message) with exit status 2.
``nodes``, ``status`` and ``rollouts`` print JSON with ``--json``. ``fleet rollout --watch`` redraws one
progress line about twice a second from summary-only ``GetRollout`` calls (cheap for 10,000
nodes) and exits 0 only when the rollout succeeded.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from swapmoe.core.sizes import format_size
from swapmoe.cli import arg_types
from swapmoe.orchestration import fleet_up
from swapmoe.cli.addresses import FLEET_PORT, PLANNER_PORT, address_type, port_number
from swapmoe.rpc import security
from swapmoe.v1 import common_pb2, fleet_pb2 as fpb, planner_pb2 as ppb

DEFAULT_FLEET = f"127.0.0.1:{FLEET_PORT}"
WATCH_S = 0.5
FINAL = (fpb.ROLLOUT_STATE_SUCCEEDED, fpb.ROLLOUT_STATE_FAILED, fpb.ROLLOUT_STATE_ABORTED)
CALL_S = 30


def _stub(address: str):
    """A stub whose calls carry the command's TLS and token (``client.security``, set by the CLI)."""
    from swapmoe.cli import client
    from swapmoe.v1 import fleet_pb2_grpc

    return fleet_pb2_grpc.FleetServiceStub(client.channel(address))


# -- what is printed -----------------------------------------------------------------------------

def _state(value: int, enum_type=fpb.RolloutState) -> str:
    return enum_type.Name(value).split("_STATE_", 1)[-1]


def node_row(node: fpb.FleetNode) -> list[str]:
    s = node.status
    plan = f"v{s.desired_plan.version}" + (" pinned" if s.pinned else "")
    return [s.node_id, node.planner, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) or "-",
            "yes" if s.connected else "no", format_size(s.budget_bytes), plan, _state(s.state, ppb.PlanState)]


def summary_line(summary: ppb.StatusSummary) -> str:
    return (f"{summary.total} executors: {summary.connected} connected, {summary.acked} acked, {summary.pending} "
            f"pending, {summary.nacked} nacked, {summary.unplanned} unplanned, {summary.pinned} pinned")


def progress_line(rollout: fpb.Rollout) -> str:
    """``rollout-3 IN_PROGRESS wave 2/4: 12 acked, 8 pending, ...``; then the message, if any."""
    line = (f"{rollout.rollout_id} {_state(rollout.state)} wave {min(rollout.wave + 1, rollout.waves)}/"
            f"{rollout.waves}: {rollout.acked} acked, {rollout.pending} pending, {rollout.nacked} nacked, "
            f"{rollout.unreachable} unreachable, {rollout.waiting} waiting")
    line += f", {rollout.rolled_back} rolled back" if rollout.rolled_back else ""
    return line + f" of {rollout.targeted}" + (f" - {rollout.message}" if rollout.message else "")


def table(rows: list[list[str]], header: list[str], out=None) -> None:
    out = out or sys.stdout
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)


# -- commands ------------------------------------------------------------------------------------

def serve(args) -> None:
    from swapmoe.cli import preflight
    from swapmoe.orchestration.fleet import serve as serve_fleet

    preflight.check_port_free(args.host, args.port)
    preflight.check_state_dir(args.state_dir)
    # The control node's own certificate serves its clients and is presented to the planners.
    with preflight.binding(args.host, args.port):
        server = serve_fleet(args.planner, f"{args.host}:{args.port}", state_dir=args.state_dir,
                             security=security.server_from_args(args, "fleet"),
                             planner_security=security.client_from_args(args, "control", cert="fleet"))
    print(f"fleet listening on {args.host}:{server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("fleet shutting down", flush=True)
    server.stop(5.0)


def nodes(args) -> None:
    stub = _stub(args.fleet)
    request = fpb.ListNodesRequest(selector=args.selector, page_size=args.page_size, page_token=args.page_token,
                                   view=ppb.STATUS_VIEW_BRIEF, connected_only=args.connected)
    listed = fpb.ListNodesResponse()
    while True:
        response = stub.ListNodes(request, timeout=CALL_S)
        listed.nodes.extend(response.nodes)
        if not (args.all_pages and response.next_page_token):
            break
        request.page_token = response.next_page_token
    if args.json:  # the pages as one answer: every node, the last page's summary and token
        del response.nodes[:]
        listed.MergeFrom(response)
        return _print_json(listed)
    rows = [node_row(n) for n in listed.nodes]
    table(rows, ["NODE", "PLANNER", "LABELS", "CONNECTED", "BUDGET", "PLAN", "STATE"])
    print(summary_line(response.summary))
    if response.unreachable_planners:
        print(f"planners not answering (their executors are missing): {', '.join(response.unreachable_planners)}")
    if response.next_page_token and not args.all_pages:
        print(f"more: --page-token {response.next_page_token} (or --all-pages)")


def rollout_request(args) -> fpb.StartRolloutRequest:
    request = fpb.StartRolloutRequest(node_ids=args.nodes, selector=args.selector, budget_bytes=args.budget or 0,
                                      wave_percents=args.waves or [], timeout_ms=int(args.timeout * 1000),
                                      bake_ms=int(args.bake_seconds * 1000), description=args.description)
    for flag, value in (("--rows", args.rows), ("--precision", args.precision)):
        if value and not args.experts:
            raise ValueError(f"{flag} is part of a plan: give --experts with it")
    if args.experts:
        request.plan.CopyFrom(common_pb2.Plan(experts_per_layer=args.experts, rows=args.rows,
                                              precision=args.precision or [], origin="swapmoe fleet rollout"))
    if args.canary is not None:
        request.canary_nodes = args.canary
    if args.max_failures is not None:
        request.max_failure_share = args.max_failures
    return request


def rollout(args) -> None:
    stub = _stub(args.fleet)
    started = stub.StartRollout(rollout_request(args), timeout=CALL_S)
    if not args.watch:
        print(f"{started.rollout_id} {_state(started.state)}: {started.targeted} nodes in {started.waves} waves")
        return
    try:
        state = watch(stub, started.rollout_id)
    except KeyboardInterrupt:
        print(f"\nstopped watching; {started.rollout_id} goes on (swapmoe fleet status {started.rollout_id})")
        state = fpb.ROLLOUT_STATE_IN_PROGRESS
    sys.exit(0 if state == fpb.ROLLOUT_STATE_SUCCEEDED else 1)


def watch(stub, rollout_id: str, out=None, interval_s: float = WATCH_S) -> int:
    """Redraw the progress line until the rollout ends; its final state. On a terminal the line
    is rewritten in place; elsewhere a line is printed whenever it changes."""
    out = out or sys.stdout
    live, last = out.isatty(), ""
    while True:
        current = stub.GetRollout(fpb.GetRolloutRequest(rollout_id=rollout_id, summary_only=True), timeout=CALL_S)
        line = progress_line(current)
        if line != last:
            out.write(f"\r\033[K{line}" if live else f"{line}\n")
            out.flush()
            last = line
        if current.state in FINAL:
            out.write("\n" if live else "")
            return current.state
        time.sleep(interval_s)


def status(args) -> None:
    stub = _stub(args.fleet)
    request = fpb.GetRolloutRequest(rollout_id=args.rollout_id, summary_only=not args.nodes, page_size=1000)
    current = stub.GetRollout(request, timeout=CALL_S)
    nodes = list(current.nodes)
    while args.nodes and current.next_page_token:
        request.page_token = current.next_page_token
        current = stub.GetRollout(request, timeout=CALL_S)
        nodes += current.nodes
    if args.json:  # the pages as one rollout, every node in it
        del current.nodes[:]
        current.nodes.extend(nodes)
        return _print_json(current)
    print(progress_line(current))
    if not args.nodes:
        return
    rows = [[n.status.node_id, n.planner, str(n.wave), _state(n.rollout_state, fpb.RolloutNodeState),
             f"v{n.status.acked_plan.version}", n.status.last_result.reason or ""] for n in nodes]
    table(rows, ["NODE", "PLANNER", "WAVE", "STATE", "ACKED", "LAST ANSWER"])


def rollouts(args) -> None:
    answer = _stub(args.fleet).ListRollouts(fpb.ListRolloutsRequest(), timeout=CALL_S)
    if args.json:
        return _print_json(answer)
    found = answer.rollouts
    table([[r.rollout_id, _state(r.state), f"{min(r.wave + 1, r.waves)}/{r.waves}", str(r.targeted), str(r.acked),
            str(r.nacked + r.unreachable), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_ns / 1e9)),
            r.message or r.request.description] for r in found],
          ["ROLLOUT", "STATE", "WAVE", "NODES", "ACKED", "FAILED", "STARTED", "MESSAGE"])


def _print_json(message) -> None:
    from swapmoe.cli.client import print_json

    print_json(message)


def act(args) -> None:
    stub = _stub(args.fleet)
    call = {"pause": stub.PauseRollout, "resume": stub.ResumeRollout, "abort": stub.AbortRollout}[args.action]
    request = fpb.RolloutActionRequest(rollout_id=args.rollout_id, reason=args.reason,
                                       rollback=getattr(args, "rollback", False))
    print(progress_line(call(request, timeout=CALL_S)))


# -- the parser ----------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _precisions(text: str) -> list[str]:
    """Comma-separated precisions per layer, '-' for the checkpoint's."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated precisions ('-': the checkpoint's), got {text!r}")
    return ["" if n == "-" else n for n in names]


def _ids(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_parser(commands) -> None:
    """The ``fleet`` command group, on the ``swapmoe`` parser's subcommands."""
    sub = commands.add_parser("fleet", help="the control node: fleet listing and staged rollouts") \
        .add_subparsers(dest="action", required=True)

    def client(name: str, help_text: str, func, json: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--fleet", type=address_type(FLEET_PORT), default=DEFAULT_FLEET,
                       help=f"control node address, HOST[:PORT] (default {DEFAULT_FLEET})")
        if json:
            p.add_argument("--json", action="store_true", help="print the answer as JSON (proto3 JSON mapping)")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("serve", help="serve the control node")
    p.add_argument("--planner", action="append", required=True, type=address_type(PLANNER_PORT),
                   help=f"planner address, HOST[:PORT] (default port {PLANNER_PORT}); repeatable: one per shard")
    p.add_argument("--state-dir", type=Path, help="keep rollouts here (DIR/rollouts/) and resume them on restart")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=FLEET_PORT,
                   help=f"port (default {FLEET_PORT}; 0 picks a free one)")
    security.add_server_arguments(p, dials_out=True)
    p.set_defaults(func=serve)

    fleet_up.add_up_parser(sub)

    p = client("nodes", "list executors across planners", nodes, json=True)
    p.add_argument("--selector", default="", help="labels, e.g. class=phone,region!=us")
    p.add_argument("--connected", action="store_true", help="only executors connected now")
    p.add_argument("--page-size", type=int, default=0, help="executors per page (default 500, at most 5000)")
    p.add_argument("--page-token", default="", help="the page after a previous listing's")
    p.add_argument("--all-pages", action="store_true", help="list every page")

    p = client("rollout", "start a staged rollout of a plan or a budget", rollout)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=_ids, default=[], help="comma-separated node ids (default: every connected)")
    where.add_argument("--selector", default="", help="connected executors with these labels, e.g. class=phone")
    p.add_argument("--experts", type=_ints, help="experts per layer, e.g. 4,4,4 (default: each planner decides)")
    p.add_argument("--rows", type=arg_types.non_negative, default=0,
                   help="with --experts: sequences decoded together at most (default 0: as many as each budget holds "
                        "up to the executor's --max-batch)")
    p.add_argument("--precision", type=_precisions,
                   help="with --experts: each layer's precision, e.g. int4,int4,- ('-': the checkpoint's; "
                        "'swapmoe describe' lists what an executor keeps: bfloat16, int8, int4)")
    p.add_argument("--budget", type=arg_types.size, help="set every target's budget, e.g. 1.5GiB")
    p.add_argument("--canary", type=int, help="nodes in the canary wave (default 1; 0: none)")
    p.add_argument("--waves", type=_ints, help="cumulative percentages after the canary (default 10,50,100)")
    p.add_argument("--max-failures", type=float, help="halt and roll back past this share of failures (default 0.05)")
    p.add_argument("--bake-seconds", type=float, default=0, help="wait between waves (default 0)")
    p.add_argument("--timeout", type=float, default=0, help="seconds each wave waits for answers (default 30)")
    p.add_argument("--description", default="", help="free text kept with the rollout")
    p.add_argument("--watch", action="store_true", help="show progress until it ends; exit 0 only on success")

    p = client("status", "show a rollout", status, json=True)
    p.add_argument("rollout_id", help="as `fleet rollout` printed it, e.g. rollout-3")
    p.add_argument("--nodes", action="store_true", help="and every node's state in it")

    client("rollouts", "list rollouts, newest first", rollouts, json=True)
    for name, help_text in (("pause", "stop a rollout before its next wave"), ("resume", "continue a paused rollout"),
                            ("abort", "end a rollout for good")):
        p = client(name, help_text, act)
        p.add_argument("rollout_id", help="as `fleet rollout` printed it, e.g. rollout-3")
        p.add_argument("--reason", default="", help="why (kept with the rollout)")
        if name == "abort":
            p.add_argument("--rollback", action="store_true", help="give the nodes reached their previous plans")
