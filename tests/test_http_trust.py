"""What the OpenAI-compatible gateway does with what a hostile or careless client sends: the API
key is checked before one byte of a body is read; a body is bounded (413) however it is sent, so
a 64 MiB body leaves the gateway's memory as it was; every bad number or string is a 400 with
OpenAI's error body naming the parameter, and an unexpected failure a JSON 500. Real gateways on
loopback (uvicorn in a thread, and the `swapmoe http serve` process whose memory is measured);
every request here is answered before an executor would be called, so none runs."""

from __future__ import annotations

import json
import socket
import threading

import pytest

pytest.importorskip("uvicorn")

from swapmoe.gateway.executor_pool import ExecutorPool  # noqa: E402
from swapmoe.gateway.http_intake import MAX_BODY_BYTES  # noqa: E402
from swapmoe.gateway.openai_http import Settings  # noqa: E402
from swapmoe.orchestration.processes import spawn  # noqa: E402

from gateways import gateway_in_thread  # noqa: E402

KEY = "sk-trust"
MODEL = "m"
HUGE = 64 << 20  # bytes: a body far over the limit


def _dead_address() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"127.0.0.1:{s.getsockname()[1]}"


class ChatTemplateBug:
    """A tokenizer whose chat template fails in a way the gateway does not expect."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, *args, **kwargs):
        raise RuntimeError("a bug in the template engine")


@pytest.fixture(scope="module")
def gateway():
    """(host, port) of a gateway with an API key in front of an executor that is not there."""
    settings = Settings(ExecutorPool([_dead_address()]), MODEL, ChatTemplateBug(), api_key=KEY)
    with gateway_in_thread(settings) as base_url:
        host, port = base_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
        yield host, int(port)


# -- raw HTTP, so a test decides what is sent and when --------------------------------------------

def open_request(address, path: str, headers: dict[str, str], method: str = "POST") -> socket.socket:
    """A connection that has sent the request line and headers, and no body yet."""
    sock = socket.create_connection(address, timeout=10)
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of a response whose connection then closes."""
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:  # the gateway closed with our unread body in its buffer
        pass
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in header_lines)}
    # A reset can drop what the gateway sent after its head (the kernel discards unread data on
    # RST): the status stands, a lost body reads as {}.
    return int(status_line.split()[1]), headers, json.loads(body) if body else {}


def send_in_background(sock: socket.socket, chunks) -> threading.Thread:
    """Send ``chunks`` on a thread until they end or the gateway stops taking them."""
    def send():
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # refused and closed: the rest is never read
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def chunked(total: int, size: int = 1 << 20):
    """A chunked request body of ``total`` bytes of JSON-looking text, then its last chunk."""
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + b"a" * size + b"\r\n"
    yield b"0\r\n\r\n"


def post(address, path: str, body: str | bytes, key: str | None = KEY) -> tuple[int, dict[str, str], dict]:
    raw = body.encode() if isinstance(body, str) else body
    headers = {"Content-Type": "application/json", "Content-Length": str(len(raw)), "Connection": "close",
               **({"Authorization": f"Bearer {key}"} if key else {})}
    sock = open_request(address, path, headers)
    sock.sendall(raw)
    return read_answer(sock)


def is_openai_error(headers: dict[str, str], body: dict) -> bool:
    return headers["content-type"] == "application/json" and set(body["error"]) == {"message", "type", "param",
                                                                                     "code"}


# -- the key before the body; the body bounded ------------------------------------------------------

def test_the_gateway_refuses_an_unauthenticated_body_before_reading_it(gateway):
    for authorization in ({}, {"Authorization": "Bearer sk-wrong"}):
        sock = open_request(gateway, "/v1/completions", {"Content-Type": "application/json",
                                                         "Content-Length": str(HUGE), **authorization})
        status, headers, body = read_answer(sock)  # answered with the body still unsent
        assert status == 401 and is_openai_error(headers, body) and body["error"]["code"] == "invalid_api_key"
        assert headers["connection"] == "close"


def test_a_body_declared_over_the_limit_is_413_before_it_is_read(gateway):
    sock = open_request(gateway, "/v1/completions", {"Content-Type": "application/json",
                                                     "Content-Length": str(MAX_BODY_BYTES + 1),
                                                     "Authorization": f"Bearer {KEY}"})
    status, headers, body = read_answer(sock)
    assert status == 413 and is_openai_error(headers, body) and str(MAX_BODY_BYTES) in body["error"]["message"]


def test_a_chunked_body_is_refused_once_it_grows_past_the_limit(gateway):
    sock = open_request(gateway, "/v1/completions", {"Content-Type": "application/json",
                                                     "Transfer-Encoding": "chunked", "Authorization": f"Bearer {KEY}"})
    sender = send_in_background(sock, chunked(HUGE))
    status, headers, body = read_answer(sock)
    assert status == 413 and is_openai_error(headers, body) and body["error"]["code"] == "request_too_large"
    sender.join(30)
    assert not sender.is_alive(), "the gateway kept reading a body past its limit"


def peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (the kernel's high-water mark, VmHWM: a spike
    between two samples of the current RSS, psutil's figure, would go unseen)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_a_64_mib_body_does_not_grow_the_gateways_memory(tmp_path):
    """Unauthenticated, it is never read; with the key, no more than the limit is held."""
    (tmp_path / "key").write_text(KEY)
    gateway = spawn("http", ["http", "serve", "--executor", _dead_address(), "--model-name", MODEL, "--port", "0",
                             "--api-key-file", str(tmp_path / "key")], timeout=120)
    try:
        host, port = gateway.address.rsplit(":", 1)
        address = (host, int(port))
        assert post(address, "/v1/completions", '{"model": "m", "prompt": [-1]}')[0] == 400  # warm up
        before = peak_rss(gateway.process.pid)
        whole = b'{"model": "m", "prompt": "' + b"a" * HUGE + b'"}'
        sock = open_request(address, "/v1/completions", {"Content-Type": "application/json",
                                                         "Content-Length": str(len(whole))})
        send_in_background(sock, [whole])
        assert read_answer(sock)[0] == 401
        grown = peak_rss(gateway.process.pid) - before
        assert grown < 2 << 20, f"an unauthenticated body grew the gateway's peak RSS by {grown >> 20} MiB"
        sock = open_request(address, "/v1/completions", {"Content-Type": "application/json",
                                                         "Transfer-Encoding": "chunked",
                                                         "Authorization": f"Bearer {KEY}"})
        send_in_background(sock, chunked(HUGE))
        assert read_answer(sock)[0] == 413
        grown = peak_rss(gateway.process.pid) - before
        assert grown < MAX_BODY_BYTES + (4 << 20), f"a chunked body grew the gateway's peak RSS by {grown >> 20} MiB"
    finally:
        assert gateway.stop() == 0, "".join(gateway.output)


# -- every bad value is a 400 naming the parameter ----------------------------------------------------

COMPLETION = '{"model": "m", "prompt": "a", '
CHAT = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], '


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", COMPLETION + f'"max_tokens": {2**64}}}', "max_tokens"),
    ("/v1/completions", COMPLETION + f'"max_tokens": {10**400}}}', "max_tokens"),
    ("/v1/completions", COMPLETION + '"max_tokens": 1e400}', "max_tokens"),
    ("/v1/completions", COMPLETION + '"top_k": 1e20}', "top_k"),
    ("/v1/completions", COMPLETION + f'"top_k": {10**20}}}', "top_k"),
    ("/v1/completions", COMPLETION + f'"seed": {2**64}}}', "seed"),
    ("/v1/completions", COMPLETION + '"temperature": NaN}', "temperature"),
    ("/v1/completions", COMPLETION + '"top_p": Infinity}', "top_p"),
    ("/v1/completions", COMPLETION + '"temperature": -Infinity}', "temperature"),
    ("/v1/completions", '{"model": "m", "prompt": [-1]}', "prompt"),
    ("/v1/completions", f'{{"model": "m", "prompt": [5, {2**32}]}}', "prompt"),
    ("/v1/completions", '{"model": "m", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "m", "prompt": "ok \\udfff"}', "prompt"),
    ("/v1/completions", COMPLETION + '"stop": ["\\ud83d"]}', "stop"),
    ("/v1/completions", COMPLETION + '"user": "\\udc00"}', "user"),
    ("/v1/chat/completions", CHAT + f'"max_completion_tokens": {2**64}}}', "max_completion_tokens"),
    ("/v1/chat/completions", CHAT + f'"max_tokens": {2**64}}}', "max_tokens"),
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "\\udbff"}]}]}', "messages"),
])
def test_a_bad_number_or_string_is_400_naming_the_parameter(gateway, path, body, param):
    status, headers, answer = post(gateway, path, body)
    assert (status, answer["error"]["param"]) == (400, param), answer
    assert is_openai_error(headers, answer) and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"].startswith(f"{param}: ")


@pytest.mark.parametrize("body", ["{", "[" * 100_000, '{"model": "m", "prompt": 1' + "0" * 5000 + "}",
                                  '"\\ud800"', "[]", b"\xff\xfe\x00"])
def test_a_body_that_is_not_a_request_is_400(gateway, body):
    status, headers, answer = post(gateway, "/v1/completions", body)
    assert status == 400 and is_openai_error(headers, answer)


def test_an_unexpected_failure_is_a_json_500(gateway):
    status, headers, answer = post(gateway, "/v1/chat/completions", CHAT + '"max_tokens": 1}')
    assert status == 500 and is_openai_error(headers, answer) and answer["error"]["type"] == "server_error"
    assert "template engine" not in answer["error"]["message"]  # what failed inside stays in the log
