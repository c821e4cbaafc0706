"""Per-role bearer tokens: who may call which RPC, checked before any handler runs.

Four roles: ``control`` may call everything but Connect (plans, budgets, rollouts, profiling);
``viewer`` reads status; ``client`` generates and watches an executor; ``executor`` opens its
Connect stream to a planner. A caller sends ``authorization: Bearer <token>``; the server
keeps only SHA-256 hashes of the tokens it issued (``--auth-tokens FILE``), so a leaked token
file grants nothing. No or an unknown token is UNAUTHENTICATED, a token whose roles do not
allow the method PERMISSION_DENIED; either way the handler never runs, so nothing changes.
Health and reflection are open, so probes need no token. Token values are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Iterable, NamedTuple

import grpc

from swapmoe.core.errors import Forbidden, InvalidField, Unauthenticated
from swapmoe.v1 import executor_pb2, fleet_pb2, planner_pb2

CONTROL, VIEWER, CLIENT, EXECUTOR = "control", "viewer", "client", "executor"
ROLES = frozenset({CONTROL, VIEWER, CLIENT, EXECUTOR})
TOKEN_FORMAT = 1
TOKEN_ENV = "SWAPMOE_TOKEN"
_OURS = "/swapmoe."  # our services' method prefix: unlisted ones are control-only, never open


def _table(service, grants: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Full method names -> roles, for the methods of ``service`` (a descriptor) that ``grants`` lists."""
    names = {m.name for m in service.methods}
    return {f"/{service.full_name}/{name}": roles for name, roles in grants.items() if name in names}


_ONLY_CONTROL = frozenset({CONTROL})
_READ = frozenset({CONTROL, VIEWER})
_EXECUTOR = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"]
_PLANNER = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"]
_FLEET = fleet_pb2.DESCRIPTOR.services_by_name["FleetService"]
# Every method of our services is listed (tests/test_security.py checks), so a new RPC gets a role on purpose.
METHOD_ROLES: dict[str, frozenset[str]] = {
    **_table(_EXECUTOR, {"Generate": frozenset({CONTROL, CLIENT}), "Describe": _READ | {CLIENT},
                         "Subscribe": _READ | {CLIENT}, "ApplyPlan": _ONLY_CONTROL,
                         "SetBudget": _ONLY_CONTROL, "Profile": _ONLY_CONTROL}),
    **_table(_PLANNER, {"Connect": frozenset({EXECUTOR}), "GetPlanStatus": _READ, "PushPlan": _ONLY_CONTROL,
                        "ProfileExecutor": _ONLY_CONTROL, "ForgetNodes": _ONLY_CONTROL}),
    **_table(_FLEET, {"ListNodes": _READ | {CLIENT}, "GetRollout": _READ, "ListRollouts": _READ,
                      "StartRollout": _ONLY_CONTROL, "PauseRollout": _ONLY_CONTROL,
                      "ResumeRollout": _ONLY_CONTROL, "AbortRollout": _ONLY_CONTROL}),
}
SERVICES = (_EXECUTOR, _PLANNER, _FLEET)


def allowed_roles(method: str) -> frozenset[str] | None:
    """The roles that may call ``method``; None when it is open (health, reflection)."""
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    return _ONLY_CONTROL if method.startswith(_OURS) else None


def hash_token(token: str) -> str:
    """What a token file stores: the token's SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class Issued(NamedTuple):
    name: str
    digest: bytes  # sha256 of the token
    roles: frozenset[str]


class TokenTable:
    """The tokens a server accepts, by hash; ``repr`` shows names only."""

    def __init__(self, issued: Iterable[Issued]):
        self._issued = tuple(issued)

    @classmethod
    def from_file(cls, path: Path) -> "TokenTable":
        """Read ``{"format": 1, "tokens": [{"name", "sha256", "roles"}]}``; errors name the entry and field."""
        try:
            document = json.loads(Path(path).read_text())
        except OSError as error:
            raise InvalidField("--auth-tokens", f"cannot read {path}: {error.strerror or error}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidField("--auth-tokens", f"{path} is not JSON ({getattr(error, 'msg', error)})") from None
        if not isinstance(document, dict) or document.get("format") != TOKEN_FORMAT:
            raise InvalidField("--auth-tokens", f"{path}: expected an object with \"format\": {TOKEN_FORMAT}")
        entries = document.get("tokens")
        if not isinstance(entries, list):
            raise InvalidField("--auth-tokens", f"{path}: \"tokens\" must be a list")
        issued = [_entry(path, i, entry) for i, entry in enumerate(entries)]
        digests = [item.digest for item in issued]
        if len(set(digests)) != len(digests):
            raise InvalidField("--auth-tokens", f"{path}: two entries have the same sha256")
        return cls(issued)

    def lookup(self, token: str) -> tuple[str, frozenset[str]] | None:
        """The name and roles issued with ``token``, or None. Every entry is compared in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for item in self._issued:
            if hmac.compare_digest(item.digest, digest):
                found = (item.name, item.roles)
        return found

    def __repr__(self) -> str:
        return f"TokenTable(names={[item.name for item in self._issued]})"


def _entry(path: Path, index: int, entry) -> Issued:
    where = f"{path}: tokens[{index}]"
    if not isinstance(entry, dict):
        raise InvalidField("--auth-tokens", f"{where} must be an object with name, sha256 and roles")
    name, digest, roles = entry.get("name"), entry.get("sha256"), entry.get("roles")
    if not isinstance(name, str) or not name:
        raise InvalidField("--auth-tokens", f"{where}.name must be a non-empty string")
    if not isinstance(digest, str) or len(digest) != 64:
        raise InvalidField("--auth-tokens", f"{where}.sha256 must be 64 hex digits")
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raise InvalidField("--auth-tokens", f"{where}.sha256 must be 64 hex digits") from None
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise InvalidField("--auth-tokens", f"{where}.roles must be a non-empty list of roles")
    unknown = sorted(set(roles) - ROLES)
    if unknown:
        raise InvalidField("--auth-tokens", f"{where}.roles: unknown role {unknown[0]!r} "
                                            f"(roles: {', '.join(sorted(ROLES))})")
    return Issued(name, raw, frozenset(roles))


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry of gRPC metadata ((key, value) pairs)."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def authorize(table: TokenTable, method: str, metadata) -> str:
    """The caller's name if ``metadata`` carries a token allowed to call ``method`` ("anonymous" for an
    open method); otherwise ``Unauthenticated`` or ``Forbidden``, naming the method and the roles."""
    allowed = allowed_roles(method)
    if allowed is None:
        return "anonymous"
    need = " or ".join(sorted(allowed))
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated(f"{method} needs a token (authorization: Bearer ...) with role {need}")
    issued = table.lookup(token)
    if issued is None:
        raise Unauthenticated(f"{method}: the token is not one this server issued (needs role {need})")
    name, roles = issued
    if not roles & allowed:
        raise Forbidden(f"{method} needs role {need}; token {name!r} has {', '.join(sorted(roles))}")
    return name


def _rejection(table: TokenTable, details) -> tuple[grpc.StatusCode, str] | None:
    """The status a call is refused with, or None when its token allows its method."""
    try:
        authorize(table, details.method, details.invocation_metadata)
    except Unauthenticated as error:
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    except Forbidden as error:
        return grpc.StatusCode.PERMISSION_DENIED, str(error)
    return None


def _replace_behavior(handler, behavior):
    """``handler`` with ``behavior`` in place of whichever of its four kinds it is."""
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: behavior})


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks tokens on a sync server; a rejected call's handler aborts without running."""

    def __init__(self, table: TokenTable):
        self.table = table

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        rejection = handler and _rejection(self.table, handler_call_details)
        if not rejection:
            return handler

        def reject(request, context):
            context.abort(*rejection)

        return _replace_behavior(handler, reject)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks tokens on a grpc.aio server. The rejecting behavior is a coroutine, which grpc.aio
    awaits for unary and streaming methods alike (a streaming coroutine writes through the context)."""

    def __init__(self, table: TokenTable):
        self.table = table

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        rejection = handler and _rejection(self.table, handler_call_details)
        if not rejection:
            return handler

        async def reject(request, context):
            await context.abort(*rejection)

        return _replace_behavior(handler, reject)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SendToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call of a sync channel."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), self._entry),
                            details.credentials, details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary

    def __repr__(self) -> str:
        return "_SendToken(<token>)"


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """``channel`` sending ``authorization: Bearer <token>`` with every call."""
    return grpc.intercept_channel(channel, _SendToken(token))


class _AioSendToken:
    """Adds the bearer token to a grpc.aio call; one subclass per call kind, as grpc.aio sorts
    interceptors by kind and takes each one for the first kind it matches."""

    def __init__(self, token: str):
        self._entry = ("authorization", f"Bearer {token}")

    async def _call(self, continuation, details, request):
        details = grpc.aio.ClientCallDetails(details.method, details.timeout,
                                             (*(details.metadata or ()), self._entry),
                                             details.credentials, details.wait_for_ready)
        return await continuation(details, request)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<token>)"


class _AioUnaryUnary(_AioSendToken, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioSendToken._call


class _AioUnaryStream(_AioSendToken, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioSendToken._call


class _AioStreamUnary(_AioSendToken, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioSendToken._call


class _AioStreamStream(_AioSendToken, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioSendToken._call


def aio_interceptors(token: str) -> list:
    """Interceptors for ``grpc.aio.*_channel(..., interceptors=...)`` that send the token with every call."""
    return [kind(token) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


def read_token(path: Path | None, flag: str = "--token-file", env: str = TOKEN_ENV) -> str | None:
    """The token in ``path`` (given as ``flag``), else ``$env``, else None; errors name where it came from."""
    if path is None:
        token, flag = os.environ.get(env, "").strip(), env
        if not token:
            return None
    else:
        try:
            token = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidField(flag, f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
        if not token:
            raise InvalidField(flag, f"{path} is empty")
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise InvalidField(flag, "the token has characters a header cannot carry (spaces, controls, non-ASCII)")
    return token
