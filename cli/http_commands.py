"""``swapmoe http serve``: the OpenAI-compatible HTTP gateway in front of executors.

The gateway needs the ``http`` extra (FastAPI, uvicorn, and transformers for the tokenizer's
chat template; no torch). It calls its executors with the client TLS and token flags
(``--security DIR`` uses DIR's client certificate and ``client.token``), and guards ``/v1/``
with the key in ``--api-key-file`` (or ``$SWAPMOE_API_KEY``; never on the command line, where
``ps`` shows it). A gateway others can reach (HTTPS, or a non-loopback ``--host``) needs a key
unless ``--no-api-key`` says it is meant to be open. Like every ``serve``, it prints
``... listening on HOST:PORT`` once bound (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.cli.addresses import EXECUTOR_PORT, address_type, port_number
from swapmoe.rpc import security, transport
from swapmoe.rpc.auth import read_token
from swapmoe.rpc.tls import is_loopback
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc

log = logging.getLogger(__name__)

DESCRIBE_S = 10.0
API_KEY_ENV = "SWAPMOE_API_KEY"


class _KeyOnCommandLine(argparse.Action):
    """``--api-key KEY``, refused: every user of the machine reads a command line in ``ps``."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"--api-key is not accepted: a key on the command line shows in `ps`; put it in a file "
                     f"for --api-key-file FILE, or in ${API_KEY_ENV}")


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
    p.add_argument("--api-key-file", type=Path, metavar="FILE",
                   help=f"require `Authorization: Bearer KEY` on /v1/, KEY being this file's content "
                        f"(default: ${API_KEY_ENV}; none: open, on a loopback plain-HTTP --host only)")
    p.add_argument("--no-api-key", action="store_true",
                   help="serve /v1/ without a key on HTTPS or a non-loopback --host, where a key is otherwise "
                        "required")
    p.add_argument("--api-key", nargs="?", action=_KeyOnCommandLine, help=argparse.SUPPRESS)
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

    from swapmoe.gateway import openai_http
    from swapmoe.gateway.executor_pool import ExecutorPool

    _check_https(args)
    api_key = read_token(args.api_key_file, "--api-key-file", API_KEY_ENV)
    _check_api_key(args, api_key)
    client_security = security.client_from_args(args, "client")
    tokenizer = openai_http.load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = args.model_name or (args.tokenizer.resolve().name if args.tokenizer else
                                described_architecture(args.executor, client_security))
    app = openai_http.create_app(openai_http.Settings(ExecutorPool(args.executor, client_security), model, tokenizer,
                                                      api_key, args.request_timeout))
    listener = socket.create_server((args.host, args.port), family=_family(args.host), backlog=2048)
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.drain_seconds,
                            ssl_certfile=args.http_tls_cert, ssl_keyfile=args.http_tls_key)
    server = uvicorn.Server(config)
    # uvicorn drains on these, then re-raises them to the handlers it found: end with 0 then, as every
    # serve does. One that comes before uvicorn has its own handlers (once the line below is out) stops it too.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    scheme = "https" if args.http_tls_cert else "http"
    print(f"openai {scheme} listening on {args.host}:{port} (model {model!r}, "
          f"{len(args.executor)} executor{'s' if len(args.executor) > 1 else ''})", flush=True)
    server.run(sockets=[listener])
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


def _check_api_key(args: argparse.Namespace, api_key: str | None) -> None:
    """Only a loopback plain-HTTP gateway may go without a key unasked: HTTPS or a non-loopback
    --host says others will reach it."""
    exposed = bool(args.http_tls_cert) or not is_loopback(args.host)
    if api_key is not None and args.no_api_key:
        raise InvalidField("--no-api-key", f"an API key is given too (--api-key-file or ${API_KEY_ENV})")
    if api_key is not None or not exposed:
        return
    if not args.no_api_key:
        served = "serves HTTPS" if args.http_tls_cert else f"listens on {args.host} (not loopback)"
        raise InvalidField("--api-key-file", f"the gateway {served} and has no API key: pass --api-key-file FILE "
                                             f"(or set ${API_KEY_ENV}), or --no-api-key to let anyone generate")
    log.warning("serving /v1/ on %s without an API key (--no-api-key): anyone who reaches it can generate", args.host)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
