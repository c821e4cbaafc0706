"""TLS for servers and channels: the PEM files a process uses, and where it may listen without them.

One certificate, key and CA per process serve both ways: the server presents the certificate
and, given a CA, requires client certificates signed by it (mutual TLS); the same files make
its outgoing channels verify the peer and present the certificate. A server reachable beyond
loopback must know who calls it: TLS, plus client certificates (a CA) or a token table. Anything
less binds only to loopback unless the operator says ``--insecure``, so an open server never
reaches a network by accident. Errors name the flag and the path, never a file's contents.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import grpc

from swapmoe.core.errors import InvalidField

log = logging.getLogger(__name__)

MAX_PEM_BYTES = 1 << 20  # a certificate chain or key is a few KiB; refuse to read a wrong, huge file


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: ``cert`` and ``key`` to present, ``ca`` to verify the peer (for a server: its clients)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS with ``cert``/``key``; with ``ca``, clients must present a certificate it signed."""
        if self.cert is None or self.key is None:
            missing = "--tls-cert" if self.cert is None else "--tls-key"
            raise InvalidField(missing, "a TLS server needs both --tls-cert and --tls-key")
        cert, key = self._pair()
        ca = _read("--tls-ca", self.ca, "CERTIFICATE") if self.ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server with ``ca`` (default: the system's roots); present ``cert``/``key`` if given."""
        ca = _read("--tls-ca", self.ca, "CERTIFICATE") if self.ca else None
        cert, key = self._pair() if (self.cert or self.key) else (None, None)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _pair(self) -> tuple[bytes, bytes]:
        if self.cert is None or self.key is None:
            given, missing = ("--tls-cert", "--tls-key") if self.key is None else ("--tls-key", "--tls-cert")
            raise InvalidField(missing, f"{given} needs {missing} too (a certificate and its private key)")
        return _read("--tls-cert", self.cert, "CERTIFICATE"), _read("--tls-key", self.key, "PRIVATE KEY")


def _read(flag: str, path: Path, kind: str) -> bytes:
    """The PEM file's bytes; a missing, unreadable or non-PEM file is an error naming ``flag``."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES + 1)
    except OSError as error:
        raise InvalidField(flag, f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_PEM_BYTES:
        raise InvalidField(flag, f"{path} is over {MAX_PEM_BYTES} bytes; not a PEM {kind.lower()}")
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise InvalidField(flag, f"{path} is not a PEM file holding a {kind.lower()}")
    return data


def host_of(address: str) -> str:
    """The host part of ``host:port``, ``[v6]:port``, a bare ``host`` or a bare IPv6 address."""
    if address.startswith("["):
        return address[1:address.find("]")] if "]" in address else address[1:]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address  # no port, or a bare IPv6 address such as ::1


def peer_ip(peer: str) -> str | None:
    """The IP address of a gRPC ``context.peer()`` (``ipv4:10.0.0.7:5678``, or ``ipv6:%5B::1%5D:5678``,
    percent-encoded), None for a peer that is not an IP connection (``unix:/path``)."""
    if not peer.startswith(("ipv4:", "ipv6:")):
        return None
    return host_of(urllib.parse.unquote(peer.split(":", 1)[1]))


def is_loopback(address: str) -> bool:
    """Whether a server bound to ``address`` is reachable only from this machine. Names other than
    ``localhost`` count as not loopback: they are not resolved."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = host_of(address).lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def check_bind(address: str, tls: TlsFiles | None, insecure: bool, checks_tokens: bool = False, *,
               flag: str = "--host", server: str = "this server",
               ways: str = "--tls-ca (client certificates: mutual TLS) or --auth-tokens FILE") -> None:
    """Refuse to serve beyond loopback without authenticating callers, unless ``insecure`` (``--insecure``).

    Beyond loopback a server needs TLS (nobody on the path reads or changes calls) and a way to
    know each caller: client certificates signed by ``tls.ca`` (mutual TLS) or, when
    ``checks_tokens``, a token per call. A certificate alone proves the server to its clients,
    not the clients to it. ``flag`` is the flag that chose ``address``, ``ways`` the flags that
    would authenticate callers; with ``insecure`` the server starts with a warning."""
    if is_loopback(address) or (tls is not None and (tls.ca is not None or checks_tokens)):
        return
    if tls is None:
        lacks, then = "has no TLS", f"pass --tls-cert/--tls-key and {ways} (or --security DIR)"
        risk = "anyone on the network can read and send calls"
    else:
        lacks = "does not authenticate its callers"
        then = f"a certificate proves only the server to its clients; add {ways} (or use --security DIR)"
        risk = "anyone who reaches it can call it"
    if not insecure:
        raise InvalidField(flag, f"{host_of(address) or address} is not a loopback address, and {server} {lacks}: "
                                 f"{then}, or --insecure to serve it anyway")
    log.warning("%s on %s %s (--insecure): %s", server, address, lacks, risk)
