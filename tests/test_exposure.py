"""Who can reach what, as an operator starts it: beyond loopback every server authenticates its
callers (TLS with client certificates or tokens) or starts only when told --insecure; an
executor's metrics are served with its gRPC port's TLS and client certificates; an HTTPS or
public gateway has an API key or is told --no-api-key; and a key never sits on a command line,
where `ps` shows it. Real processes: each refuses at start-up with one line and exit status 2,
or serves."""

from __future__ import annotations

import http.client
import logging
import re
import socket
import ssl
import urllib.request
from concurrent import futures

import grpc
import psutil
import pytest

from swapmoe.core.errors import InvalidField
from swapmoe.cli.devcerts import make_dev_certs
from swapmoe.rpc.auth import TokenTable
from swapmoe.rpc.security import ServerSecurity
from swapmoe.rpc.tls import TlsFiles, check_bind
from swapmoe.orchestration.processes import Service, launch, spawn

from polling import wait_until


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("exposure-certs")
    make_dev_certs(directory)
    return directory


def start(*args: str) -> Service:
    """``swapmoe *args``, once it listens or has exited."""
    service = launch(args[0], list(args))
    wait_until(service.listening.is_set, timeout=120, what=f"`swapmoe {' '.join(args[:2])}` to listen or exit")
    return service


def refusal(service: Service) -> str:
    """The one line a server printed when it refused to start (exit status 2, never listening)."""
    try:
        assert not service.address, f"it started: {''.join(service.output)}"
        assert service.process.wait(30) == 2
    finally:
        service.stop()
    lines = [line for line in service.output if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("swapmoe: error: "), "".join(service.output)
    return lines[0]


def certificate_alone(certs, name: str) -> list[str]:
    return ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}-key.pem")]


# -- gRPC servers -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("role", ["planner", "executor", "fleet"])
def test_a_server_with_a_certificate_alone_refuses_a_public_address_naming_the_flags_to_add(certs, role,
                                                                                             tiny_model_dir):
    extra = {"planner": [], "executor": ["--model", str(tiny_model_dir), "--budget", "1GiB"],
             "fleet": ["--planner", "127.0.0.1:1"]}[role]
    line = refusal(start(role, "serve", "--host", "0.0.0.0", "--port", "0", *extra, *certificate_alone(certs, role)))
    assert line.startswith("swapmoe: error: --host: 0.0.0.0 is not a loopback address")
    assert "does not authenticate its callers" in line
    assert all(flag in line for flag in ("--tls-ca", "--auth-tokens", "--security", "--insecure"))


# -- metrics ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_are_never_served_beyond_loopback_without_client_certificates(certs, tiny_model_dir):
    serve = ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB", "--port", "0",
             "--metrics-port", "0"]
    tokens_only = [*certificate_alone(certs, "executor"), "--auth-tokens", str(certs / "tokens.json")]
    line = refusal(start(*serve, "--host", "0.0.0.0", *tokens_only))  # the gRPC port checks tokens; metrics cannot
    assert line.startswith("swapmoe: error: --metrics-host: 0.0.0.0 is not a loopback address, and the metrics "
                           "server does not authenticate its callers")
    assert "--tls-ca" in line and "--insecure" in line
    line = refusal(start(*serve, "--metrics-host", "0.0.0.0"))  # plaintext gRPC on loopback, metrics exposed
    assert "--metrics-host: 0.0.0.0" in line and "the metrics server has no TLS" in line


@pytest.mark.slow
def test_metrics_are_served_over_mutual_tls_with_the_executors_certificate(certs, tiny_model_dir):
    executor = spawn("executor", ["executor", "serve", "--model", str(tiny_model_dir), "--budget", "1GiB",
                                  "--port", "0", "--metrics-port", "0", "--security", str(certs)], timeout=300)
    try:
        url = next(m[1] for line in executor.output if (m := re.search(r"metrics on (\S+)", line)))
        assert url.startswith("https://127.0.0.1:")

        def scrape(url: str, context: ssl.SSLContext | None = None) -> bytes:
            with urllib.request.urlopen(url, timeout=10, context=context) as answer:
                return answer.read()

        verifying = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        for refused in (lambda: scrape(url.replace("https://", "http://")), lambda: scrape(url, verifying)):
            with pytest.raises((OSError, http.client.HTTPException)):  # plaintext; TLS without a client certificate
                refused()
        verifying.load_cert_chain(certs / "client.pem", certs / "client-key.pem")
        assert b"swapmoe_memory_budget_bytes" in scrape(url, verifying)
        host, port = url.removeprefix("https://").split("/")[0].rsplit(":", 1)
        with socket.create_connection((host, int(port))):  # connects, never says hello: holds up nobody
            assert b"swapmoe_memory_budget_bytes" in scrape(url, verifying)
    finally:
        assert executor.stop() == 0, "".join(executor.output)


# -- the HTTP gateway -----------------------------------------------------------------------------------

def gateway_serve(*flags: str) -> list[str]:
    return ["http", "serve", "--executor", "127.0.0.1:1", "--model-name", "m", "--port", "0", *flags]


@pytest.mark.slow
def test_an_https_or_public_gateway_without_an_api_key_refuses_to_start(certs, monkeypatch):
    monkeypatch.delenv("SWAPMOE_API_KEY", raising=False)
    https = ["--http-tls-cert", str(certs / "executor.pem"), "--http-tls-key", str(certs / "executor-key.pem")]
    for flags, why in [(https, "serves HTTPS"), (["--host", "0.0.0.0", "--insecure"], "listens on 0.0.0.0")]:
        line = refusal(start(*gateway_serve(*flags)))
        assert line.startswith(f"swapmoe: error: --api-key-file: the gateway {why}") and "--no-api-key" in line


@pytest.mark.slow
def test_an_open_gateway_beyond_loopback_must_be_asked_for_and_warns(monkeypatch):
    monkeypatch.delenv("SWAPMOE_API_KEY", raising=False)
    gateway = spawn("http", gateway_serve("--host", "0.0.0.0", "--insecure", "--no-api-key"))
    assert gateway.stop() == 0
    assert "without an API key (--no-api-key)" in "".join(gateway.output)
    gateway = spawn("http", gateway_serve())  # loopback plain HTTP: open, as before
    assert gateway.stop() == 0


@pytest.mark.slow
def test_an_api_key_is_read_from_a_file_never_from_the_command_line(tmp_path):
    line = refusal(start(*gateway_serve("--api-key", "sk-in-ps")))
    assert "shows in `ps`" in line and "--api-key-file" in line and "sk-in-ps" not in line
    (tmp_path / "key").write_text("sk-in-a-file\n")
    gateway = spawn("http", gateway_serve("--api-key-file", str(tmp_path / "key")))
    try:
        assert not any("sk-in-a-file" in word for word in psutil.Process(gateway.process.pid).cmdline())

        def status(key: str) -> int:
            request = urllib.request.Request(f"http://{gateway.address}/v1/models",
                                             headers={"Authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status
            except urllib.error.HTTPError as error:
                return error.code

        assert (status("sk-in-a-file"), status("sk-in-ps")) == (200, 401)
    finally:
        assert gateway.stop() == 0, "".join(gateway.output)


def test_a_plaintext_server_binds_beyond_loopback_only_when_told_insecure(certs):
    with pytest.raises(InvalidField, match="--host.*--tls-cert/--tls-key.*--insecure"):
        check_bind("0.0.0.0:50051", None, insecure=False)
    check_bind("0.0.0.0:50051", None, insecure=True)
    check_bind("127.0.0.1:50051", None, insecure=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(InvalidField):
        ServerSecurity().add_port(server, "0.0.0.0:0")


def test_beyond_loopback_a_tls_server_must_also_authenticate_its_callers(certs, caplog):
    """A certificate proves the server to its clients, not the clients to it: beyond loopback it
    needs client certificates (a CA) or tokens too, or --insecure (which warns)."""
    certificate = TlsFiles(certs / "planner.pem", certs / "planner-key.pem")
    with pytest.raises(InvalidField, match="--host: 0.0.0.0 .*does not authenticate its callers.*--tls-ca.*"
                                           "--auth-tokens.*--insecure"):
        check_bind("0.0.0.0:50051", certificate, insecure=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(InvalidField, match="--tls-ca"):
            ServerSecurity(certificate).add_port(server, "0.0.0.0:0")
        mutual = TlsFiles(certificate.cert, certificate.key, certs / "ca.pem")
        tokens = TokenTable.from_file(certs / "tokens.json")
        assert ServerSecurity(mutual).add_port(server, "0.0.0.0:0") > 0
        assert ServerSecurity(certificate, tokens).add_port(server, "0.0.0.0:0") > 0
        assert ServerSecurity(certificate).add_port(server, "127.0.0.1:0") > 0  # loopback: as before
        with caplog.at_level(logging.WARNING):
            assert ServerSecurity(certificate, insecure=True).add_port(server, "0.0.0.0:0") > 0
        assert "does not authenticate its callers (--insecure)" in caplog.text
    finally:
        server.stop(None)
