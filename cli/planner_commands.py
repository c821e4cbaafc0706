"""``swapmoe planner status`` and ``swapmoe planner forget``: what a planner knows of its executors,
and releasing the node ids of executors gone for good; and ``swapmoe planner serve``'s planning
options (where profiles are, what plans must meet)."""

from __future__ import annotations

from pathlib import Path

from swapmoe.cli import arg_types
from swapmoe.cli.addresses import PLANNER_PORT, address_type
from swapmoe.v1 import planner_pb2 as ppb, planner_pb2_grpc


def status(args) -> None:
    from swapmoe.cli import client

    client.print_plan_status(args.planner, args.node_ids, as_json=args.json)


def forget(args) -> None:
    from swapmoe.cli import client

    stub = planner_pb2_grpc.PlannerServiceStub(client.channel(args.planner))
    response = stub.ForgetNodes(ppb.ForgetNodesRequest(node_ids=args.node_ids), timeout=30)
    if args.json:
        return client.print_json(response)
    for node_id in response.forgotten:
        print(f"forgot {node_id}: its id may be claimed by a new executor")


def add_parsers(planner) -> None:
    """The client commands on the ``swapmoe planner`` subcommands."""
    address_help = f"planner address, HOST[:PORT] (default 127.0.0.1:{PLANNER_PORT})"
    p = planner.add_parser("status", help="each executor's plan, predicted and measured figures, workload and why")
    p.add_argument("--planner", type=address_type(PLANNER_PORT), default=f"127.0.0.1:{PLANNER_PORT}", help=address_help)
    p.add_argument("--json", action="store_true", help="print the GetPlanStatus answer as JSON (proto3 JSON mapping)")
    p.add_argument("node_ids", nargs="*", help="executors to show (default: all)")
    p.set_defaults(func=status)
    p = planner.add_parser("forget", help="forget executors that are away (records, plans, node secrets), so their "
                                          "node ids can be claimed again, e.g. by an executor that lost its state")
    p.add_argument("--planner", type=address_type(PLANNER_PORT), default=f"127.0.0.1:{PLANNER_PORT}", help=address_help)
    p.add_argument("--json", action="store_true", help="print the ForgetNodes answer as JSON")
    p.add_argument("node_ids", nargs="+", help="the executors to forget (each must be away)")
    p.set_defaults(func=forget)


def add_planning_arguments(p) -> None:
    """How ``swapmoe planner serve`` chooses plans: its accuracy profiles and its objective."""
    p.add_argument("--profiles", type=Path, action="append", default=[],
                   help="a root of accuracy profiles (`swapmoe profile accuracy --root`: ROOT/<model fingerprint>/"
                        "accuracy/<set>/); repeatable (default: that command's, env SWAPMOE_PROFILES); the bundled "
                        "models' own are found after these. Executors of a model without one get the even split")
    p.add_argument("--latency-target-ms", type=float, default=0,
                   help="plans must predict at most this many ms between tokens of each stream at the offered load "
                        "(requests running and waiting; default: each device's latency at its update-frequency "
                        "inflection point, as it grows when every offered stream runs at once)")
    p.add_argument("--throughput-target", type=arg_types.non_negative_finite, default=0.0, metavar="TOKENS_PER_S",
                   help="plans must also predict at least this many tokens/s over all streams at the offered load "
                        "(default: none)")
    p.add_argument("--verify", type=arg_types.non_negative, default=0, metavar="N",
                   help="measured before pushed: where the search's best N plans are predicted within E_accuracy's "
                        "held-out error of each other, score them on the model's profiling set (its checkpoint and "
                        "torch must be on this host) and keep the best measured; seconds per plan on the bundled "
                        "models, minutes at paper scale (default 0: off)")
    p.add_argument("--no-device-profiling", action="store_true",
                   help="do not profile new devices through their Connect stream (they keep the even split "
                        "until a device profile is stored under --state-dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the genetic search (default 0)")


def planning_settings(args):
    from swapmoe.planner_service.policy import PlannerSettings
    from swapmoe.planner_service.search import SearchSettings
    from swapmoe.profiler.artifacts import default_root

    return PlannerSettings(accuracy_roots=tuple(args.profiles or [default_root()]),
                           latency_target_ns=args.latency_target_ms * 1e6 if args.latency_target_ms else None,
                           throughput_target=args.throughput_target, verify=args.verify,
                           profile_devices=not args.no_device_profiling,
                           search=SearchSettings(seed=args.seed))

