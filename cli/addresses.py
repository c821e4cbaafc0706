"""Server addresses as people type them: ``HOST`` alone dials the role's default port.

One helper for every ``--executor``, ``--planner`` and ``--fleet`` flag, so ``swapmoe describe
--executor jetson-7`` works as ``grpcurl`` and ``kubectl port-forward`` users expect. IPv6
literals keep their brackets (``[::1]``, ``[::1]:50051``); gRPC target URIs (``unix:/run/x.sock``,
``dns:///host:port``, ``ipv4:...``) pass through untouched.
"""

from __future__ import annotations

import argparse

EXECUTOR_PORT = 50051
PLANNER_PORT = 50052
FLEET_PORT = 50053

# gRPC name-resolver schemes (gRPC's doc/naming.md): these already say where to go.
_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:", "dns:")


def with_default_port(address: str, port: int) -> str:
    """``address`` with ``port`` added when it names only a host; ValueError when it is malformed."""
    address = address.strip()
    if not address:
        raise ValueError("empty address: expected HOST or HOST:PORT")
    if "://" in address or address.startswith(_SCHEMES):
        return address
    if address.startswith("["):  # [IPv6] or [IPv6]:PORT
        host, bracket, rest = address.partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"malformed address {address!r}: expected [IPv6] or [IPv6]:PORT")
        return f"{address}:{port}" if not rest else _checked(address, rest[1:])
    if address.count(":") > 1:  # an IPv6 literal cannot carry a port without brackets
        return f"[{address}]:{port}"
    host, colon, given = address.partition(":")
    return _checked(address, given) if colon else f"{address}:{port}"


def _checked(address: str, port: str) -> str:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"malformed address {address!r}: the port must be a number from 1 to 65535")
    return address


def address_type(port: int):
    """An argparse ``type`` for a server address whose default port is ``port``."""

    def address(text: str) -> str:
        try:
            return with_default_port(text, port)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return address


def port_number(text: str) -> int:
    """An argparse ``type`` for a port to listen on: 0 (pick a free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port is 0 (pick a free one) to 65535, got {value}")
    return value
