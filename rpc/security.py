"""What a process is configured with for TLS and tokens, from its command line.

A process presents one certificate and trusts one CA, both as a server and when it dials out,
so a server's TLS flags also configure its outgoing channels and the two flag sets share their
destinations:

- a server (``add_server_arguments``): ``--tls-cert``, ``--tls-key``, ``--tls-ca`` (the CA its
  clients' certificates must be signed by: mutual TLS; also the CA it verifies the servers it
  dials with), ``--auth-tokens FILE``, ``--insecure``, ``--security DIR``; with
  ``dials_out=True`` (the executor, the control node) also ``--token-file``, the token it sends;
- a client command (``add_client_arguments``): ``--tls-ca``, ``--tls-cert``, ``--tls-key`` (a
  client certificate, for mutual TLS), ``--token-file``, ``--security DIR``.

``--security DIR`` is the directory ``swapmoe dev-certs`` writes: certificate ``DIR/<cert>.pem``,
key ``DIR/<cert>-key.pem``, CA ``DIR/ca.pem``, token hashes ``DIR/tokens.json`` and token
``DIR/<role>.token``. A flag given explicitly overrides its file from DIR; a token comes from
``--token-file``, else DIR, else ``$SWAPMOE_TOKEN``. Files are read and checked when the
configuration is built, so a bad one stops the process at start-up, not at the first call.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField
from swapmoe.rpc.auth import AioAuthInterceptor, AuthInterceptor, TokenTable, aio_interceptors, read_token, with_token
from swapmoe.rpc.tls import TlsFiles, check_bind, is_loopback

log = logging.getLogger(__name__)

CERT_NAMES = ("planner", "executor", "fleet", "client")  # certificates dev-certs writes


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (None: plaintext), the tokens it accepts (None: every call is allowed), and whether a
    server that does not authenticate its callers may bind beyond loopback."""

    tls: TlsFiles | None = None
    tokens: TokenTable | None = None
    insecure: bool = False

    def check_bind(self, address: str) -> None:
        """Refuse ``address`` beyond loopback unless TLS with client certificates or tokens (or
        ``insecure``) covers it: ``swapmoe.rpc.tls.check_bind``."""
        check_bind(address, self.tls, self.insecure, checks_tokens=self.tokens is not None)

    def add_port(self, server, address: str) -> int:
        """Bind a sync or grpc.aio ``server`` to ``address`` with TLS when configured; the bound port."""
        self.check_bind(address)
        if self.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self.tls.server_credentials())
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {address}")
        return port

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """For a sync server: put these first, so a rejected call takes no stream slot."""
        return [] if self.tokens is None else [AuthInterceptor(self.tokens)]

    def aio_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [] if self.tokens is None else [AioAuthInterceptor(self.tokens)]


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """TLS for outgoing channels (None: plaintext) and the token sent with every call."""

    tls: TlsFiles | None = None
    token: str | None = None

    def channel(self, address: str, options) -> grpc.Channel:
        """A sync channel to ``address`` with ``options`` (``swapmoe.rpc.transport.CHANNEL_OPTIONS``)."""
        self._warn_if_exposed(address)
        if self.tls is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, self.tls.channel_credentials(), options=options)
        return channel if self.token is None else with_token(channel, self.token)

    def aio_channel(self, address: str, options) -> grpc.aio.Channel:
        self._warn_if_exposed(address)
        interceptors = None if self.token is None else aio_interceptors(self.token)
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=options,
                                       interceptors=interceptors)

    def _warn_if_exposed(self, address: str) -> None:
        if self.token is not None and self.tls is None and not is_loopback(address):
            log.warning("sending a token to %s without TLS: anyone on the path can read it", address)

    def __repr__(self) -> str:
        return f"ClientSecurity(tls={self.tls!r}, token={'<set>' if self.token else None})"


def add_server_arguments(parser: argparse.ArgumentParser, dials_out: bool = False) -> None:
    """TLS, token and bind flags of a server; ``dials_out`` adds ``--token-file`` for its outgoing calls."""
    group = parser.add_argument_group("security")
    group.add_argument("--security", type=Path, metavar="DIR",
                       help="a `swapmoe dev-certs` directory: this process's certificate and key, the CA, "
                            "tokens.json" + (" and its token" if dials_out else "") + " (flags below override it)")
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate (with --tls-key)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="require client certificates signed by this CA (mutual TLS); also verifies the "
                            "servers this process dials")
    group.add_argument("--auth-tokens", type=Path, metavar="FILE",
                       help="accept only the tokens hashed in this file (JSON, from dev-certs), by role")
    group.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without TLS, or with TLS but neither client certificates "
                            "(--tls-ca) nor tokens (--auth-tokens)")
    if dials_out:
        _add_token_file(group)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS and token flags of a command that calls a server."""
    group = parser.add_argument_group("security")
    group.add_argument("--security", type=Path, metavar="DIR",
                       help="a `swapmoe dev-certs` directory: the CA, the client certificate and the token "
                            "(flags below override it)")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="connect with TLS, verifying the server with this CA")
    group.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="connect with TLS, presenting this client certificate (mutual TLS; with --tls-key)")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's private key")
    _add_token_file(group)


def _add_token_file(group) -> None:
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help="send the token in this file with every call (default: $SWAPMOE_TOKEN)")


def server_from_args(args: argparse.Namespace, role: str) -> ServerSecurity:
    """The server's configuration; ``role`` names its certificate in ``--security`` (planner, executor, fleet)."""
    directory = _directory(args)
    tls = _tls(args, directory, role)
    if tls is not None:
        tls.server_credentials()  # check the files now
    tokens_file = getattr(args, "auth_tokens", None) or (directory / "tokens.json" if directory else None)
    tokens = TokenTable.from_file(tokens_file) if tokens_file else None
    return ServerSecurity(tls, tokens, bool(getattr(args, "insecure", False)))


def client_from_args(args: argparse.Namespace, role: str, cert: str = "client") -> ClientSecurity:
    """Outgoing calls' configuration: ``role`` names the token in ``--security`` (control, viewer, client,
    executor), ``cert`` the certificate (a server process passes its own: executor, fleet)."""
    directory = _directory(args)
    tls = _tls(args, directory, cert)
    if tls is not None:
        tls.channel_credentials()  # check the files now
    token_file = getattr(args, "token_file", None) or (directory / f"{role}.token" if directory else None)
    return ClientSecurity(tls, read_token(token_file))


def _directory(args: argparse.Namespace) -> Path | None:
    directory = getattr(args, "security", None)
    if directory is not None and not Path(directory).is_dir():
        raise InvalidField("--security", f"{directory} is not a directory; `swapmoe dev-certs {directory}` makes one")
    return None if directory is None else Path(directory)


def _tls(args: argparse.Namespace, directory: Path | None, cert: str) -> TlsFiles | None:
    """The TLS files from explicit flags over ``directory``'s; None when neither names any."""
    if cert not in CERT_NAMES:
        raise ValueError(f"no certificate named {cert!r} (one of {', '.join(CERT_NAMES)})")
    base = TlsFiles()
    if directory is not None:
        base = TlsFiles(directory / f"{cert}.pem", directory / f"{cert}-key.pem", directory / "ca.pem")
    files = TlsFiles(cert=getattr(args, "tls_cert", None) or base.cert, key=getattr(args, "tls_key", None) or base.key,
                     ca=getattr(args, "tls_ca", None) or base.ca)
    return None if files == TlsFiles() else files
