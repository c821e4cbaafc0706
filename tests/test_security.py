"""Security: TLS and mutual TLS with dev-certs' files, per-role tokens checked before any handler
runs (sync and grpc.aio servers), loopback-only plaintext, and secrets kept out of reprs and logs.
Servers are real, on loopback; their methods are raw-bytes stand-ins under our services' names."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import stat
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from swapmoe.core.errors import Forbidden, InvalidField, Unauthenticated
from swapmoe.cli.devcerts import make_dev_certs
from swapmoe.rpc import auth
from swapmoe.rpc.auth import METHOD_ROLES, TokenTable, authorize, hash_token
from swapmoe.rpc.security import (ClientSecurity, ServerSecurity, add_client_arguments, add_server_arguments,
                                  client_from_args, server_from_args)
from swapmoe.rpc.status import status_for
from swapmoe.rpc.tls import TlsFiles, is_loopback

PUSH = "/swapmoe.v1.PlannerService/PushPlan"            # control only
CONNECT = "/swapmoe.v1.PlannerService/Connect"          # executor only, stream-stream
GENERATE = "/swapmoe.v1.ExecutorService/Generate"       # client or control, unary-stream
OPTIONS = [("grpc.max_receive_message_length", 1 << 20)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("security")
    make_dev_certs(directory)
    return directory


def token(certs, role: str) -> str:
    return (certs / f"{role}.token").read_text().strip()


# --- servers -----------------------------------------------------------------------------------

def _handlers(calls: list, aio: bool):
    """PushPlan (unary), Generate (unary-stream), Connect (stream-stream): each records that it ran."""
    if aio:
        async def unary(request, context):
            calls.append(request)
            return request

        async def server_stream(request, context):
            calls.append(request)
            yield request

        async def bidi(requests, context):
            async for request in requests:
                calls.append(request)
                yield request
    else:
        def unary(request, context):
            calls.append(request)
            return request

        def server_stream(request, context):
            calls.append(request)
            yield request

        def bidi(requests, context):
            for request in requests:
                calls.append(request)
                yield request
    return (grpc.method_handlers_generic_handler("swapmoe.v1.PlannerService", {
                "PushPlan": grpc.unary_unary_rpc_method_handler(unary),
                "Connect": grpc.stream_stream_rpc_method_handler(bidi)}),
            grpc.method_handlers_generic_handler("swapmoe.v1.ExecutorService", {
                "Generate": grpc.unary_stream_rpc_method_handler(server_stream)}))


@contextlib.contextmanager
def sync_server(security: ServerSecurity):
    """A grpc.server with the health service and the stand-ins; yields (port, calls)."""
    calls: list = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=security.interceptors())
    server.add_generic_rpc_handlers(_handlers(calls, aio=False))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = security.add_port(server, "127.0.0.1:0")
    server.start()
    try:
        yield port, calls
    finally:
        server.stop(None)


@contextlib.contextmanager
def aio_server(security: ServerSecurity, async_handlers: bool = True):
    """A grpc.aio server on an event loop of its own thread; yields (port, calls). With sync
    handlers it runs them on a migration thread pool, as a server moved to grpc.aio may."""
    calls: list = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        pool = None if async_handlers else futures.ThreadPoolExecutor(max_workers=2)
        server = grpc.aio.server(pool, interceptors=security.aio_interceptors())
        server.add_generic_rpc_handlers(_handlers(calls, aio=async_handlers))
        port = security.add_port(server, "127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield port, calls
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def check_health(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def calls_of(channel: grpc.Channel) -> dict[str, callable]:
    """One call of each stand-in, as functions of no argument."""
    return {
        PUSH: lambda: channel.unary_unary(PUSH)(b"push", timeout=5),
        GENERATE: lambda: list(channel.unary_stream(GENERATE)(b"generate", timeout=5)),
        CONNECT: lambda: list(channel.stream_stream(CONNECT)(iter([b"hello"]), timeout=5)),
    }


# --- the role table ----------------------------------------------------------------------------

def test_every_rpc_of_our_services_is_given_roles():
    methods = {f"/{service.full_name}/{m.name}" for service in auth.SERVICES for m in service.methods}
    assert set(METHOD_ROLES) == methods, "give each new RPC its roles in swapmoe.rpc.auth.METHOD_ROLES"
    assert METHOD_ROLES[CONNECT] == {"executor"}
    control_only = ["ExecutorService/ApplyPlan", "ExecutorService/SetBudget", "ExecutorService/Profile",
                    "PlannerService/PushPlan", "PlannerService/ProfileExecutor", "FleetService/StartRollout",
                    "FleetService/PauseRollout", "FleetService/ResumeRollout", "FleetService/AbortRollout"]
    assert all(METHOD_ROLES[f"/swapmoe.v1.{m}"] == {"control"} for m in control_only)
    assert all("control" in roles for method, roles in METHOD_ROLES.items() if method != CONNECT)


def test_open_methods_need_no_token_and_unlisted_rpcs_of_ours_are_control_only():
    table = TokenTable([])
    assert authorize(table, "/grpc.health.v1.Health/Check", ()) == "anonymous"
    with pytest.raises(Unauthenticated):
        authorize(table, "/swapmoe.v1.PlannerService/SomethingNew", ())


# --- TLS and mutual TLS ------------------------------------------------------------------------

def test_a_tls_server_answers_a_tls_client_and_refuses_plaintext(certs):
    server = ServerSecurity(TlsFiles(certs / "planner.pem", certs / "planner-key.pem"))
    with sync_server(server) as (port, _):
        with ClientSecurity(TlsFiles(ca=certs / "ca.pem")).channel(f"127.0.0.1:{port}", OPTIONS) as channel:
            check_health(channel)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            assert code_of(lambda: check_health(plaintext)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(certs):
    args = _server_parser().parse_args(["--security", str(certs)])
    with sync_server(server_from_args(args, "planner")) as (port, _):
        address = f"localhost:{port}"
        with ClientSecurity(TlsFiles(ca=certs / "ca.pem")).channel(address, OPTIONS) as no_certificate:
            assert code_of(lambda: check_health(no_certificate)) == grpc.StatusCode.UNAVAILABLE
        with client_from_args(args, "executor", cert="executor").channel(address, OPTIONS) as executor:
            check_health(executor)  # health is open: no token needed
            assert code_of(calls_of(executor)[CONNECT]) == grpc.StatusCode.OK


def test_each_dev_certificate_serves_or_dials_only_as_its_process_does(certs):
    """client.pem only dials and planner.pem only serves (the planner never dials out); the
    executor's and the control node's serve and dial. A stolen client.pem cannot pose as a server."""
    from swapmoe.cli.devcerts import USES
    from swapmoe.rpc.security import CERT_NAMES

    assert set(USES) == set(CERT_NAMES)
    verifying = ClientSecurity(TlsFiles(ca=certs / "ca.pem"))
    for name in CERT_NAMES:
        with sync_server(ServerSecurity(TlsFiles(certs / f"{name}.pem", certs / f"{name}-key.pem"))) as (port, _):
            with verifying.channel(f"localhost:{port}", OPTIONS) as channel:
                served = code_of(lambda: check_health(channel)) == grpc.StatusCode.OK
        assert served == ("server" in USES[name]), name
    mutual = TlsFiles(certs / "executor.pem", certs / "executor-key.pem", certs / "ca.pem")
    with sync_server(ServerSecurity(mutual)) as (port, _):
        for name in CERT_NAMES:
            dialing = ClientSecurity(TlsFiles(certs / f"{name}.pem", certs / f"{name}-key.pem", certs / "ca.pem"))
            with dialing.channel(f"localhost:{port}", OPTIONS) as channel:
                dialed = code_of(lambda: check_health(channel)) == grpc.StatusCode.OK
            assert dialed == ("client" in USES[name]), name
    assert (USES["client"], USES["planner"]) == (("client",), ("server",))


def test_tls_files_errors_name_the_flag_and_path_never_the_contents(tmp_path, certs):
    secret = tmp_path / "not-a-cert.pem"
    secret.write_text("hunter2-private-material")
    with pytest.raises(InvalidField) as error:
        TlsFiles(secret, certs / "client-key.pem").server_credentials()
    assert error.value.field == "--tls-cert" and str(secret) in str(error.value) and "hunter2" not in str(error.value)
    with pytest.raises(InvalidField, match="--tls-key.*missing.pem"):
        TlsFiles(certs / "client.pem", tmp_path / "missing.pem").channel_credentials()
    with pytest.raises(InvalidField, match="--tls-key"):
        TlsFiles(cert=certs / "client.pem").channel_credentials()


# --- tokens ------------------------------------------------------------------------------------

def _expect_roles(channel_for, port):
    """What each role's token (or none) may call on a server with dev-certs' tokens."""
    for role, expected in [(None, {PUSH: "UNAUTHENTICATED", GENERATE: "UNAUTHENTICATED"}),
                           ("bogus", {PUSH: "UNAUTHENTICATED", CONNECT: "UNAUTHENTICATED"}),
                           ("client", {PUSH: "PERMISSION_DENIED", GENERATE: "OK", CONNECT: "PERMISSION_DENIED"}),
                           ("control", {PUSH: "OK", GENERATE: "OK", CONNECT: "PERMISSION_DENIED"}),
                           ("executor", {CONNECT: "OK", PUSH: "PERMISSION_DENIED"})]:
        with channel_for(role, f"127.0.0.1:{port}") as channel:
            calls = calls_of(channel)
            got = {method: code_of(calls[method]).name for method in expected}
            assert got == expected, role


def test_tokens_are_checked_by_role_before_the_handler_runs(certs):
    tokens = {"bogus": "not-issued", **{r: token(certs, r) for r in ("client", "control", "executor")}}

    def channel_for(role, address):
        return ClientSecurity(token=tokens.get(role)).channel(address, OPTIONS)

    with sync_server(ServerSecurity(tokens=TokenTable.from_file(certs / "tokens.json"))) as (port, calls):
        _expect_roles(channel_for, port)
        assert calls == [b"generate", b"push", b"generate", b"hello"]  # the allowed calls only


@pytest.mark.parametrize("async_handlers", [True, False], ids=["async-handlers", "sync-handlers"])
def test_the_aio_interceptor_rejects_unary_and_streaming_calls_alike(certs, async_handlers):
    tokens = {"bogus": "not-issued", **{r: token(certs, r) for r in ("client", "control", "executor")}}

    def channel_for(role, address):
        return ClientSecurity(token=tokens.get(role)).channel(address, OPTIONS)

    security = ServerSecurity(tokens=TokenTable.from_file(certs / "tokens.json"))
    with aio_server(security, async_handlers) as (port, calls):
        _expect_roles(channel_for, port)
        assert calls == [b"generate", b"push", b"generate", b"hello"]


def test_an_aio_channel_sends_its_token_with_every_kind_of_call(certs):
    async def run(port):
        codes = {}
        for role in ("client", "control"):
            security = ClientSecurity(token=token(certs, role))
            async with security.aio_channel(f"127.0.0.1:{port}", OPTIONS) as channel:
                for method, call in [(PUSH, lambda: channel.unary_unary(PUSH)(b"push", timeout=5)),
                                     (GENERATE, lambda: _drain(channel.unary_stream(GENERATE)(b"g", timeout=5)))]:
                    try:
                        await call()
                        codes[role, method] = "OK"
                    except grpc.aio.AioRpcError as error:
                        codes[role, method] = error.code().name
        return codes

    with sync_server(ServerSecurity(tokens=TokenTable.from_file(certs / "tokens.json"))) as (port, _):
        codes = asyncio.run(run(port))
    assert codes == {("client", PUSH): "PERMISSION_DENIED", ("client", GENERATE): "OK",
                     ("control", PUSH): "OK", ("control", GENERATE): "OK"}


async def _drain(call):
    return [message async for message in call]


def test_a_token_file_is_rejected_precisely(tmp_path):
    def entry(**fields):
        return {"name": "ops", "sha256": hash_token("t"), "roles": ["control"], **fields}

    for tokens, message in [([entry(roles=["admin"])], r"tokens\[0\].roles: unknown role 'admin'"),
                            ([entry(sha256="zz" * 32)], r"tokens\[0\].sha256 must be 64 hex digits"),
                            ([{"name": "ops"}], r"tokens\[0\].sha256"),
                            ([entry(), entry(name="twin")], "same sha256")]:
        path = tmp_path / "tokens.json"
        path.write_text(json.dumps({"format": 1, "tokens": tokens}))
        with pytest.raises(InvalidField, match=message):
            TokenTable.from_file(path)
    path.write_text("{not json")
    with pytest.raises(InvalidField, match="--auth-tokens.*not JSON"):
        TokenTable.from_file(path)


def test_auth_errors_map_to_their_statuses_and_name_the_roles_not_the_token(certs):
    table = TokenTable.from_file(certs / "tokens.json")
    client = token(certs, "client")
    with pytest.raises(Forbidden) as error:
        authorize(table, PUSH, [("authorization", f"Bearer {client}")])
    assert "PushPlan needs role control" in str(error.value) and client not in str(error.value)
    assert status_for(error.value) == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(Unauthenticated("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert authorize(table, GENERATE, [("authorization", f"bearer {client}")]) == "client"


def test_token_values_never_appear_in_reprs_or_logs(certs, caplog):
    control = token(certs, "control")
    security = ClientSecurity(TlsFiles(ca=certs / "ca.pem"), control)
    table = TokenTable.from_file(certs / "tokens.json")
    caplog.set_level(logging.DEBUG)
    with sync_server(ServerSecurity(tokens=table)) as (port, _):
        with ClientSecurity(token=control).channel(f"127.0.0.1:{port}", OPTIONS) as channel:
            code_of(calls_of(channel)[CONNECT])
        ClientSecurity(token=control).channel("10.255.255.1:1", OPTIONS).close()  # warns: plaintext token
    assert "without TLS" in caplog.text
    texts = [repr(security), str(security), repr(table), repr(ServerSecurity(tokens=table)), caplog.text,
             repr(auth.aio_interceptors(control))]
    assert not [text for text in texts if control in text or hash_token(control) in text]


def test_read_token_prefers_the_file_then_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SWAPMOE_TOKEN", "from-env")
    (tmp_path / "t").write_text("from-file\n")
    assert auth.read_token(tmp_path / "t") == "from-file"
    assert auth.read_token(None) == "from-env"
    monkeypatch.delenv("SWAPMOE_TOKEN")
    assert auth.read_token(None) is None
    (tmp_path / "t").write_text("two words")
    with pytest.raises(InvalidField, match="--token-file"):
        auth.read_token(tmp_path / "t")


# --- binding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:0", True), ("localhost:50051", True), ("[::1]:5", True), ("::1", True), ("127.3.4.5:1", True),
    ("unix:/tmp/s", True), ("0.0.0.0:1", False), ("[::]:1", False), ("10.1.2.3:4", False),
    ("example.com:1", False), (":50051", False)])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


# --- flags -------------------------------------------------------------------------------------

def _server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    add_server_arguments(parser, dials_out=True)
    return parser


def test_security_dir_maps_to_dev_certs_files_and_flags_override_it(certs, tmp_path):
    (tmp_path / "mine.token").write_text("mine\n")
    args = _server_parser().parse_args(["--security", str(certs), "--tls-ca", str(certs / "ca.pem"),
                                        "--token-file", str(tmp_path / "mine.token")])
    server = server_from_args(args, "executor")
    assert server.tls == TlsFiles(certs / "executor.pem", certs / "executor-key.pem", certs / "ca.pem")
    assert server.tokens.lookup(token(certs, "viewer")) == ("viewer", frozenset({"viewer"}))
    client = client_from_args(args, "executor", cert="executor")
    assert client.tls == server.tls and client.token == "mine"

    parser = argparse.ArgumentParser()
    add_client_arguments(parser)
    client = client_from_args(parser.parse_args(["--security", str(certs)]), "control")
    assert client.tls == TlsFiles(certs / "client.pem", certs / "client-key.pem", certs / "ca.pem")
    assert client.token == token(certs, "control")
    assert client_from_args(parser.parse_args([]), "control") == ClientSecurity(None, os.environ.get("SWAPMOE_TOKEN"))
    assert server_from_args(_server_parser().parse_args([]), "planner") == ServerSecurity()
    with pytest.raises(InvalidField, match="--security"):
        server_from_args(_server_parser().parse_args(["--security", str(tmp_path / "none")]), "planner")


def test_dev_certs_keeps_keys_and_tokens_owner_only_and_refuses_to_overwrite(tmp_path):
    written = make_dev_certs(tmp_path / "d", hosts=["node1.example", "10.0.0.5"], days=2)
    private = [p for p in written if p.name.endswith(("-key.pem", ".token"))]
    assert len(private) == 9 and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in private)
    with pytest.raises(InvalidField, match="--force"):
        make_dev_certs(tmp_path / "d")
    before = (tmp_path / "d" / "control.token").read_text()
    make_dev_certs(tmp_path / "d", force=True)
    assert (tmp_path / "d" / "control.token").read_text() != before
