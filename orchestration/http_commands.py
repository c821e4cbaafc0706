"""``swapmoe http serve``: the OpenAI-compatible HTTP gateway in front of executors.

The gateway needs the ``http`` extra (FastAPI, uvicorn, and transformers for the tokenizer's
chat template; no torch). It calls its executors with the client TLS and token flags
(``--security DIR`` uses DIR's client certificate and ``client.token``), and guards ``/v1/``
with ``--api-key`` (or ``$SWAPMOE_API_KEY``). Like every ``serve``, it prints
``... listening on HOST:PORT`` once bound (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.orchestration.addresses import EXECUTOR_PORT, address_type, port_number
from swapmoe.rpc import security, transport
from swapmoe.rpc.tls import is_loopback
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

DESCRIBE_S = 10.0


def add_parser(commands) -> None:
    """The ``http`` command group, on the ``swapmoe`` parser's subcommands."""
    sub = commands.add_parser("http", help="an OpenAI-compatible HTTP API in front of executors") \
        .add_subparsers(dest="action", required=True)
    p = sub.add_parser("serve", help="serve /v1/completions, /v1/chat/completions, /v1/models and /health")
    p.add_argument("--executor", action="append", required=True, metavar="HOST:PORT", type=address_type(EXECUTOR_PORT),
                   help="executor address (repeatable: each request goes to the one with the fewest of this "
                        "gateway's requests open)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("SWAPMOE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/ (default: $SWAPMOE_API_KEY; none: open)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="the served checkpoint's directory, for its chat template (without it, chat "
                        "completions answer 400; token counts come from the executor either way)")
    p.add_argument("--model-name", help="the model id clients send (default: the --tokenizer directory's name, "
                                        "else the executor's architecture)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one generation may take; past it the answer is 504 (default 600)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, let open requests finish for up to this long (default 30)")
    p.add_argument("--http-tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate")
    p.add_argument("--http-tls-key", type=Path, metavar="PEM", help="the HTTPS certificate's private key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without HTTPS")
    security.add_client_arguments(p)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> None:
    import uvicorn  # missing: the CLI names the extra to install (cli.EXTRA_OF_MODULE)

    from swapmoe.orchestration import openai_http
    from swapmoe.orchestration.executor_pool import ExecutorPool

    _check_https(args)
    client_security = security.client_from_args(args, "client")
    tokenizer = openai_http.load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = args.model_name or (args.tokenizer.resolve().name if args.tokenizer else
                                described_architecture(args.executor, client_security))
    app = openai_http.create_app(openai_http.Settings(ExecutorPool(args.executor, client_security), model, tokenizer,
                                                      args.api_key or None, args.request_timeout))
    listener = socket.create_server((args.host, args.port), family=_family(args.host), backlog=2048)
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.drain_seconds,
                            ssl_certfile=args.http_tls_cert, ssl_keyfile=args.http_tls_key)
    scheme = "https" if args.http_tls_cert else "http"
    print(f"openai {scheme} listening on {args.host}:{port} (model {model!r}, "
          f"{len(args.executor)} executor{'s' if len(args.executor) > 1 else ''})", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn drains on these, then re-raises them to the
        signal.signal(sig, lambda *_: None)       # handlers it found: end with 0 then, as every serve does
    uvicorn.Server(config).run(sockets=[listener])
    print("openai http stopped", flush=True)


def described_architecture(addresses: list[str], client_security) -> str:
    """The model name when none is given: the architecture the first answering executor describes."""
    failures = []
    for address in addresses:
        stub = executor_pb2_grpc.ExecutorServiceStub(transport.channel(address, client_security))
        try:
            return stub.Describe(epb.DescribeRequest(), timeout=DESCRIBE_S).layout.architecture
        except grpc.RpcError as error:
            failures.append(f"{address}: {error.code().name}")
    raise InvalidField("--model-name", f"not given, and no executor answered Describe to name the model "
                                       f"({', '.join(failures)}); pass --model-name or --tokenizer")


def _check_https(args: argparse.Namespace) -> None:
    if bool(args.http_tls_cert) != bool(args.http_tls_key):
        raise InvalidField("--http-tls-cert", "needs --http-tls-key, and the other way round")
    if not args.http_tls_cert and not is_loopback(args.host) and not args.insecure:
        raise InvalidField("--host", f"{args.host} is not a loopback address and the gateway has no HTTPS: pass "
                                     "--http-tls-cert/--http-tls-key, or --insecure to serve plain HTTP anyway "
                                     "(API keys then cross the network readable)")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
