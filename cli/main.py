"""The ``swapmoe`` command: servers, a client, the control node and the demo."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from importlib import metadata
from pathlib import Path

import grpc

from swapmoe.core import logs
from swapmoe.core.errors import Corrupted, NotFound
from swapmoe.core.labels import parse_labels
from swapmoe.cli import (arg_types, devcerts, env_defaults, fleet_commands, http_commands, planner_commands,
                          preflight)
from swapmoe.rpc import security
from swapmoe.rpc.tls import check_bind
from swapmoe.profiler import commands as profile_commands
from swapmoe.cli.addresses import EXECUTOR_PORT, FLEET_PORT, PLANNER_PORT, address_type, port_number


def _serve_until_signalled(server, name: str) -> None:
    """Print the bound address, then serve until SIGINT/SIGTERM and drain in-flight calls."""
    print(f"{name} listening on {server.address}", flush=True)
    for note in server.notes:
        print(note, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"{name} shutting down", flush=True)
    server.stop()


class _Running:
    """A started transport.Server plus the address clients use, and what to stop with it."""

    def __init__(self, server, host: str, on_stop=(), drain_seconds: float = 5.0, notes=()):
        self.server, self.address, self.on_stop = server, f"{host}:{server.port}", on_stop
        self.drain_seconds, self.notes = drain_seconds, notes

    def stop(self):
        for fn in self.on_stop:
            fn()
        self.server.stop(self.drain_seconds)


def executor_serve(args) -> None:
    metrics_host = args.metrics_host or args.host
    preflight.check_port_free(args.host, args.port)
    preflight.check_port_free(metrics_host, args.metrics_port, "--metrics-port")
    preflight.check_state_dir(args.state_dir)
    preflight.check_model(Path(args.model))
    from swapmoe.executor.engine import Engine, EngineConfig
    from swapmoe.executor.planner_link import PlannerLink
    from swapmoe.executor.server import serve

    config = EngineConfig(args.model, args.budget, device=args.device, max_context=args.max_context,
                          max_queue=args.max_queue, max_batch=args.max_batch, state_dir=args.state_dir,
                          threads=args.threads, precision=args.precision, dense_precision=args.dense_precision,
                          load_bandwidth=args.load_bandwidth)
    if args.node_id:
        config.node_id = args.node_id
    labels = parse_labels("--label", args.label)
    server_security = security.server_from_args(args, "executor")
    dial_security = security.client_from_args(args, "executor", cert="executor")
    if not args.insecure:  # before the model loads (with --insecure, binding warns)
        server_security.check_bind(f"{args.host}:{args.port}")
    if args.metrics_port is not None:
        _check_metrics_bind(metrics_host, server_security)
    engine = Engine(config)
    try:
        with preflight.binding(args.host, args.port):
            server = serve(engine, f"{args.host}:{args.port}", max_subscribers=args.max_subscribers,
                           security=server_security)
    except ValueError:
        engine.close()
        raise
    address = f"{args.advertise_host or args.host}:{server.port}"
    stops = [engine.hub.close_all]  # ends Subscribe streams so shutdown can drain
    if args.planner:
        link = PlannerLink(engine, args.planner, address, labels=labels, security=dial_security).start()
        stops.append(link.stop)
    if args.metrics_port is not None:
        from swapmoe.executor.prometheus import serve_metrics

        metrics = serve_metrics(engine, metrics_host, args.metrics_port, tls=server_security.tls)
        scheme = "http" if server_security.tls is None else "https"
        print(f"metrics on {scheme}://{metrics_host}:{metrics.server_port}/metrics", flush=True)
        stops.append(metrics.shutdown)
    _serve_until_signalled(_Running(server, args.host, stops, args.drain_seconds, notes=(engine.threads.setting.reason,)),
                           "executor")


def _check_metrics_bind(host: str, server_security: security.ServerSecurity) -> None:
    """Metrics are served with the gRPC port's TLS; beyond loopback they need its client
    certificates too, since the metrics server cannot check tokens."""
    check_bind(host, server_security.tls, server_security.insecure, flag="--metrics-host",
               server="the metrics server", ways="--tls-ca (client certificates: mutual TLS)")


# The planner's threads (control port, pushes, the event loop) take turns at the interpreter; a
# thread that waits for its turn waits up to this long (Python's default is 5 ms), and a health
# check on the control port waits several times while 10,000 streams keep the loop busy.
INTERPRETER_SWITCH_S = 0.001


def planner_serve(args) -> None:
    preflight.check_port_free(args.host, args.port)
    preflight.check_port_free(args.host, args.control_port, "--control-port")
    preflight.check_state_dir(args.state_dir)
    from swapmoe.planner_service.heap import HeapSettings
    from swapmoe.planner_service.claims import RegistrySettings
    from swapmoe.planner_service.server import serve

    settings = planner_commands.planning_settings(args)
    control = None if args.control_port is None else f"{args.host}:{args.control_port}"
    sys.setswitchinterval(INTERPRETER_SWITCH_S)
    with preflight.binding(args.host, args.port):
        server, _ = serve(f"{args.host}:{args.port}", state_dir=args.state_dir, max_executors=args.max_executors,
                          settings=settings, security=security.server_from_args(args, "planner"),
                          control_address=control, heap=HeapSettings(),
                          records=RegistrySettings(args.max_nodes, away_ttl_s=args.forget_after_hours * 3600))
    notes = [f"planner control RPCs and health also on {args.host}:{server.control_port}"] if control else []
    _serve_until_signalled(_Running(server, args.host, notes=notes), "planner")


def generate(args) -> None:
    from swapmoe.cli import client

    target = args.executor
    if args.fleet:
        if not args.model:
            raise ValueError("--fleet needs --model: the model to route to (its executors' `model` label)")
        from swapmoe.orchestration.balancing import Router

        target = Router(args.fleet, channel_factory=client.channel)
    client.stream_generation(target, args.prompt, model=args.model or "", selector=args.selector,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, stop=args.stop)


def describe(args) -> None:
    from swapmoe.cli import client

    client.print_description(args.executor, as_json=args.json)


def set_budget(args) -> None:
    from swapmoe.cli import client

    client.set_budget(args.executor, args.budget, args.reason, as_json=args.json)


def demo(args) -> None:
    from swapmoe.cli.demo import run_demo

    sys.exit(run_demo(args))


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, as every other error of the command (subcommands inherit this)."""

    def error(self, message: str):
        self.exit(2, f"swapmoe: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    try:
        return metadata.version("swapmoe")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="swapmoe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get("SWAPMOE_LOG_FORMAT", "text"),
                        help="log lines as text, or one JSON object per line (env SWAPMOE_LOG_FORMAT; default text)")
    parser.add_argument("--version", action="version", version=f"swapmoe {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def server(sub, help_text, default_port):
        p = sub.add_parser("serve", help=help_text)
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        p.add_argument("--port", type=port_number, default=default_port,
                       help=f"port (default {default_port}; 0 picks a free one)")
        return p

    executor = commands.add_parser("executor", help="the on-device executor").add_subparsers(dest="action", required=True)
    p = server(executor, "serve a checkpoint within a memory budget", EXECUTOR_PORT)
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--budget", required=True, type=arg_types.size, help="memory budget, e.g. 512MiB, 2GiB, 2Gi, 1.5GB")
    p.add_argument("--planner", type=address_type(PLANNER_PORT),
                   help=f"planner address to dial out to, HOST[:PORT] (default port {PLANNER_PORT})")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label the planner and control node select this executor by, e.g. class=phone "
                        "(repeatable; model=<checkpoint directory name> and device=<cpu|cuda> are added unless given)")
    p.add_argument("--node-id", help="stable identity of this executor (default: host name)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--max-context", type=int, default=0, help="longest prompt + completion (default: model limit, <= 2048)")
    p.add_argument("--max-batch", type=arg_types.positive, default=8,
                   help="the most generations decoded together in one forward pass (continuous batching: a plan "
                        "names its rows up to this, the budget pays for each one's KV cache, and a budget cut runs "
                        "fewer at once; encoder-decoder models run one at a time) (default 8)")
    p.add_argument("--max-queue", type=arg_types.non_negative, default=64,
                   help="generation requests that may wait for their turn; more get RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--threads", type=arg_types.non_negative, default=0,
                   help="torch intra-op threads of the forward pass (default 0: by measurement: the count the last "
                        "device profile chose, kept in --state-dir, else a probe of a few decode passes per count at "
                        "start-up; each with an expert load beside it, the fewest threads within noise of the fastest)")
    p.add_argument("--precision", default="", choices=["bfloat16", "int8", "int4"],
                   help="the experts' precision in the starting plan, until a planner's plan says otherwise: "
                        "bfloat16 (float32 checkpoints), int8 or int4 (default: the checkpoint's; a budget too small "
                        "for one expert per layer at it starts at int4)")
    p.add_argument("--dense-precision", default="", choices=["bfloat16", "int8", "int4"],
                   help="the weights outside the routed experts (attention, shared experts, dense MLPs; not the "
                        "routers or embeddings), lowered as they load: bfloat16 (float32 checkpoints), int8 or int4 "
                        "(default: the checkpoint's). Every token reads them all: on a CPU, int4 decodes faster")
    p.add_argument("--load-bandwidth", type=arg_types.size_or_zero, default=0,
                   help="cap expert reads at this many bytes per second, e.g. 200MiB (default: no cap)")
    p.add_argument("--state-dir", type=Path,
                   help="keep the last acknowledged plan and the planner's node secret here, and resume them on restart")
    p.add_argument("--max-subscribers", type=arg_types.positive, default=32,
                   help="telemetry streams served at once; more get RESOURCE_EXHAUSTED (default 32)")
    p.add_argument("--metrics-port", type=port_number,
                   help="serve Prometheus metrics on this port (0 picks a free one); HTTPS with the executor's "
                        "certificate when it has one, and client certificates required when it has --tls-ca")
    p.add_argument("--advertise-host", help="the name clients reach this executor by (default: --host): under mutual "
                   "TLS published if its certificate names it; without, the planner publishes its stream's source IP")
    p.add_argument("--metrics-host", help="address to serve metrics on (default: --host); beyond loopback they "
                                          "need mutual TLS (--tls-ca) or --insecure")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, let in-flight streams finish for up to this long (default 30)")
    security.add_server_arguments(p, dials_out=True)
    p.set_defaults(func=executor_serve)

    planner = commands.add_parser("planner", help="the planner service").add_subparsers(dest="action", required=True)
    p = server(planner, "serve the planner", PLANNER_PORT)
    p.add_argument("--state-dir", type=Path,
                   help="keep each executor's plans (desired, acknowledged, pinned, why), the device profiles "
                        "measured and the frontiers searched here, and restore them on restart")
    p.add_argument("--max-executors", type=arg_types.positive, default=20_000,
                   help="executors connected at once; more are refused with RESOURCE_EXHAUSTED (default 20000; "
                        "each holds a connection: raise `ulimit -n` past twice this)")
    planner_commands.add_planning_arguments(p)
    p.add_argument("--max-nodes", type=arg_types.positive, default=100_000,
                   help="executors remembered, connected or away; a new node id past this is refused with "
                        "RESOURCE_EXHAUSTED unless some expired (default 100000)")
    p.add_argument("--forget-after-hours", type=float, default=168.0,
                   help="forget an executor away this long (its node id may then be claimed anew; default 168: a "
                        "week); one that never acknowledged a plan is forgotten 10 minutes after it left")
    p.add_argument("--control-port", type=port_number,
                   help="also serve the control RPCs and health on this port, on threads of their own: they answer "
                        "within tens of ms while thousands of executors register or take a push, which on --port "
                        "can take seconds; point the control node and health probes here (0 picks a free one; "
                        "default: --port only)")
    security.add_server_arguments(p)
    p.set_defaults(func=planner_serve)
    planner_commands.add_parsers(planner)

    fleet_commands.add_parser(commands)
    http_commands.add_parser(commands)

    p = commands.add_parser("generate", help="stream a completion from an executor")
    target = p.add_mutually_exclusive_group()
    executor_help = f"executor address, HOST[:PORT] (default 127.0.0.1:{EXECUTOR_PORT})"
    target.add_argument("--executor", type=address_type(EXECUTOR_PORT), default=f"127.0.0.1:{EXECUTOR_PORT}",
                        help=executor_help)
    target.add_argument("--fleet", type=address_type(FLEET_PORT),
                        help=f"control node address, HOST[:PORT] (default port {FLEET_PORT}): the least-loaded "
                             "healthy executor serving --model answers")
    p.add_argument("--model", help="with --fleet: the model to route to (the checkpoint directory's name)")
    p.add_argument("--selector", default="", help="with --fleet: label selector, e.g. class=phone,region=eu")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0: greedy; otherwise 0.001 to 100)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this share of probability (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--seed", type=int, help="seed of the sampler, for repeatable samples")
    p.add_argument("--stop", action="append", default=[], help="end the completion at this text (repeatable)")
    p.add_argument("prompt", help="the text to continue (an encoder-decoder model answers it)")
    p.set_defaults(func=generate)

    p = commands.add_parser("describe", help="show an executor's model, budget and plan")
    p.add_argument("--executor", type=address_type(EXECUTOR_PORT), default=f"127.0.0.1:{EXECUTOR_PORT}",
                   help=executor_help)
    p.add_argument("--json", action="store_true", help="print the Describe answer as JSON (proto3 JSON mapping)")
    p.set_defaults(func=describe)

    p = commands.add_parser("budget", help="change an executor's memory budget")
    p.add_argument("--executor", type=address_type(EXECUTOR_PORT), default=f"127.0.0.1:{EXECUTOR_PORT}",
                   help=executor_help)
    p.add_argument("--reason", default="", help="why, recorded with the budget change")
    p.add_argument("--json", action="store_true", help="print the SetBudget answer as JSON (proto3 JSON mapping)")
    p.add_argument("budget", type=arg_types.size, help="the new budget, e.g. 512MiB, 2Gi, 1.5GB")
    p.set_defaults(func=set_budget)

    profile_commands.add_parser(commands)
    devcerts.add_parser(commands)

    p = commands.add_parser("demo", help="planner + executor: a searched plan, a budget cut, a workload shift")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--budget", help="the starting memory budget (default: room for every expert)")
    p.add_argument("--prompt", default="def fibonacci(n):", help="the text to continue (default: a code prompt)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.set_defaults(func=demo)
    for leaf in _client_commands(parser):
        security.add_client_arguments(leaf)
    env_defaults.apply_to_servers(parser, os.environ)
    return parser


# Commands that call a server with the client token; every other client command is a control one.
CLIENT_ROLE_COMMANDS = {"generate", "describe", "http"}


def _client_commands(parser: argparse.ArgumentParser):
    """Every command that calls a server (it names one with --executor, --planner or --fleet) and
    serves nothing (no --host): each takes the client's TLS and token flags."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subcommands:
        for sub in action.choices.values():
            yield from _client_commands(sub)
    options = {o for a in parser._actions for o in a.option_strings}
    if not subcommands and options & {"--executor", "--planner", "--fleet"} and "--host" not in options:
        yield parser


# Each process installs only what it needs (pyproject's extras); a command that needs more says which.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "transformers", "safetensors", "tokenizers", "numpy", "psutil", "prometheus_client",
                     "tqdm"), "executor"),
    **dict.fromkeys(("ray", "sklearn", "matplotlib", "pymoo"), "planner"),
    "rouge_score": "models",
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "pydantic"), "http"),
}


def _fail(message: str, status: int = 2):
    """End the command with one line on stderr, whatever the message held (gRPC details can span lines)."""
    print(f"swapmoe: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(status)


def _server_called(args) -> str:
    """Who a client command was talking to, for its error line: ``executor 10.0.0.7:50051``."""
    for flag, role in (("fleet", "control node"), ("executor", "executor"), ("planner", "planner")):
        address = getattr(args, flag, None)
        if isinstance(address, str) and address:
            return f"{role} {address}"
    return "the server"


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
    except env_defaults.EnvError as error:  # a SWAPMOE_... variable the command's flag does not accept
        _fail(str(error))
    try:
        logs.configure(args.log_format, args.verbose)
    except ValueError as error:  # SWAPMOE_LOG_FORMAT names no format
        _fail(f"SWAPMOE_LOG_FORMAT: {error}")
    try:
        if hasattr(args, "token_file") and not hasattr(args, "auth_tokens"):  # a client command
            from swapmoe.cli import client

            role = "client" if args.command in CLIENT_ROLE_COMMANDS else "control"
            client.security = security.client_from_args(args, role)
        args.func(args)
    except grpc.RpcError as error:  # UNAVAILABLE, INVALID_ARGUMENT, NOT_FOUND, DEADLINE_EXCEEDED, ...
        _fail(f"{_server_called(args)}: {error.code().name}: {error.details()}")
    except (ValueError, NotFound) as error:  # what argparse cannot see: a budget below minimum, no such model
        _fail(str(error))
    except Corrupted as error:  # a damaged expert store: marked, and rebuilt by the next start
        _fail(str(error), 1)
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        _fail(f"this command needs {error.name}, which this installation lacks; "
              f"install it with: pip install \"swapmoe[{extra}]\"")
    except OSError as error:  # a file or socket the command needed (a TLS key it may not read, ...)
        _fail(str(error))
    except KeyboardInterrupt:  # Ctrl-C on a client command: stop quietly, as shells expect
        sys.exit(130)


if __name__ == "__main__":
    main()
