"""``swapmoe planner status`` and ``swapmoe planner forget``: what a planner knows of its executors,
and releasing the node ids of executors gone for good."""

from __future__ import annotations

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
