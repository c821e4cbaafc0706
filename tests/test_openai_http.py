"""The OpenAI-compatible HTTP gateway, spoken to with OpenAI's own client: a real executor on
loopback, the gateway in uvicorn (in a thread, and once as the `swapmoe http serve` process a
user runs), and the executor's gRPC answer as the reference for text and token counts."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from swapmoe.executor.engine import Engine, EngineConfig  # noqa: E402
from swapmoe.executor.server import serve  # noqa: E402
from swapmoe.models.tiny import save_tiny_model  # noqa: E402
from swapmoe.gateway.executor_pool import ExecutorPool  # noqa: E402
from swapmoe.gateway.openai_http import Settings, load_tokenizer  # noqa: E402
from swapmoe.orchestration.processes import spawn  # noqa: E402
from swapmoe.rpc import transport  # noqa: E402
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc  # noqa: E402

from gateways import gateway_in_thread  # noqa: E402
from polling import wait_until  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-chat"
LONG = 4000  # tokens: a generation that outlasts the test unless it is cancelled
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Mixtral (byte-level tokenizer: one token per byte) with room for long generations."""
    return save_tiny_model("mixtral", tmp_path_factory.mktemp("http-mixtral"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def executor(model_dir):
    with Engine(EngineConfig(model_dir, budget_bytes=1 << 30, node_id="http")) as engine:
        server = serve(engine)
        try:
            yield engine, f"127.0.0.1:{server.port}"
        finally:
            server.stop(grace=1)


@pytest.fixture(scope="module")
def chat_tokenizer(model_dir, tmp_path_factory):
    """A copy of the checkpoint's tokenizer with a chat template added (the checkpoint has none)."""
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    for path in model_dir.glob("tokenizer*"):
        shutil.copy(path, directory / path.name)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def gateway(executor, chat_tokenizer):
    settings = Settings(ExecutorPool([executor[1]]), MODEL, load_tokenizer(chat_tokenizer), api_key=KEY)
    with gateway_in_thread(settings) as base_url:
        yield base_url


def client(base_url: str, key: str = KEY, **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, **{"timeout": 60, **options})


def grpc_generation(address: str, prompt: str, max_tokens: int) -> tuple[str, epb.GenerateResponse]:
    """The same request through the executor's gRPC API, greedy: (text, last chunk)."""
    with transport.channel(address) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        chunks = list(stub.Generate(epb.GenerateRequest(text=prompt, max_new_tokens=max_tokens), timeout=60))
    return "".join(c.text for c in chunks), chunks[-1]


def http(method: str, url: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def idle(engine: Engine) -> bool:
    return engine.running == 0 and engine.queue_depth == 0


# -- completions --------------------------------------------------------------------------------

def test_a_streamed_completion_is_the_executors_greedy_output_chunk_by_chunk_with_usage_last(gateway, executor):
    expected, last = grpc_generation(executor[1], "def fibonacci(n):", 24)
    chunks = list(client(gateway).completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=24,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) > 1, "the answer was not streamed"
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == \
        (last.usage.prompt_tokens, last.usage.completion_tokens) == (len("def fibonacci(n):"), 24)
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 24


def test_a_whole_completion_reports_the_text_and_usage_the_executor_counted(gateway, executor):
    expected, last = grpc_generation(executor[1], "import os\n", 12)
    reply = client(gateway).completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0)
    assert reply.object == "text_completion" and reply.model == MODEL
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.prompt_tokens + 12)
    as_ids = client(gateway).completions.create(model=MODEL, prompt=[b + 3 for b in b"import os\n"], max_tokens=12,
                                                temperature=0)  # the byte tokenizer: byte b is id b + 3
    assert as_ids.choices[0].text == expected
    status, body = http("POST", gateway + "/completions", {"model": MODEL, "prompt": "import os\n", "max_tokens": 12,
                                                           "temperature": 0, "top_p": None, "seed": None})
    assert status == 200 and body["choices"][0]["text"] == expected  # null is the default, as OpenAI takes it


def test_a_seeded_sampled_completion_repeats_and_a_stop_sequence_ends_it(gateway):
    api = client(gateway)
    first, again = (api.completions.create(model=MODEL, prompt="x = ", max_tokens=16, temperature=1.5, top_p=0.9,
                                           seed=7).choices[0].text for _ in range(2))
    assert first == again
    stop = first[3:5] or first[:1]
    stopped = api.completions.create(model=MODEL, prompt="x = ", max_tokens=16, temperature=1.5, top_p=0.9, seed=7,
                                     stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and first.startswith(stopped.choices[0].text)


# -- chat -----------------------------------------------------------------------------------------

def test_a_streamed_chat_completion_prompts_with_the_tokenizers_chat_template(gateway, executor):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"
    expected, last = grpc_generation(executor[1], rendered, 20)
    chunks = list(client(gateway).chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == last.usage.prompt_tokens == len(rendered.encode())  # one per byte


def test_a_whole_chat_completion_answers_as_the_assistant(gateway, executor):
    rendered = "<|user|>\nwrite a loop\n<|assistant|>\n"
    expected, last = grpc_generation(executor[1], rendered, 10)
    reply = client(gateway).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "write a loop"}]}],
        max_completion_tokens=10, temperature=0)
    assert reply.object == "chat.completion"
    assert (reply.choices[0].message.role, reply.choices[0].message.content) == ("assistant", expected)
    assert reply.usage.prompt_tokens == last.usage.prompt_tokens and reply.usage.completion_tokens == 10


# -- the API around them ------------------------------------------------------------------------

def test_models_lists_the_served_model_and_health_the_executor(gateway):
    assert [m.id for m in client(gateway).models.list()] == [MODEL]
    status, body = http("GET", gateway.removesuffix("/v1") + "/health", key=None)
    assert status == 200 and list(body["executors"].values()) == ["SERVING"]


def test_a_wrong_or_missing_api_key_is_401_with_an_openai_error(gateway):
    with pytest.raises(openai.AuthenticationError) as error:
        client(gateway, key="sk-wrong").models.list()
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    status, body = http("POST", gateway + "/completions", {"model": MODEL, "prompt": "a"}, key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_a_bad_parameter_is_400_naming_it_whether_the_gateway_or_the_executor_refuses_it(gateway):
    api = client(gateway)
    with pytest.raises(openai.BadRequestError) as error:  # outside OpenAI's range: the gateway
        api.completions.create(model=MODEL, prompt="a", temperature=5)
    assert error.value.param == "temperature" and "temperature" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:  # above the executor's limit: its INVALID_ARGUMENT
        api.completions.create(model=MODEL, prompt="a", max_tokens=5000)
    assert error.value.param == "max_tokens" and "4096" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(model=MODEL, prompt="a", n=2)
    assert error.value.param == "n"
    with pytest.raises(openai.NotFoundError) as error:
        api.completions.create(model="gpt-4", prompt="a")
    assert error.value.code == "model_not_found"


def test_token_ids_that_are_not_the_models_are_400_naming_the_prompt(gateway, executor):
    vocabulary = executor[0].layout.vocab_size
    for ids in ([-1], [1 << 32], [vocabulary]):  # no id at all, none a request can carry, none of this model's
        status, body = http("POST", gateway + "/completions", {"model": MODEL, "prompt": ids, "max_tokens": 1})
        assert (status, body["error"]["param"], body["error"]["type"]) == (400, "prompt", "invalid_request_error"), ids
        assert str(ids[0]) in body["error"]["message"]


# -- cancellation -------------------------------------------------------------------------------

def test_closing_a_stream_after_its_first_chunk_stops_the_generation_on_the_executor(gateway, executor):
    engine = executor[0]
    wait_until(lambda: idle(engine), what="an idle executor")
    before = engine.stats.tokens_total
    stream = client(gateway).completions.create(model=MODEL, prompt="once upon a time", max_tokens=LONG,
                                                temperature=0, stream=True)
    next(iter(stream))
    assert engine.running == 1
    stream.close()
    wait_until(lambda: idle(engine), timeout=10, what="the executor to drop the request")
    generated = engine.stats.tokens_total - before
    time.sleep(0.3)
    assert engine.stats.tokens_total - before == generated, "the generation went on after the client left"
    assert generated < LONG / 4


@pytest.mark.slow
def test_a_client_that_gives_up_on_a_whole_answer_stops_the_generation(gateway, executor):
    engine = executor[0]
    wait_until(lambda: idle(engine), what="an idle executor")
    before = engine.stats.tokens_total
    with pytest.raises(openai.APITimeoutError):
        client(gateway, timeout=1.0).completions.create(model=MODEL, prompt="a", max_tokens=LONG, temperature=0)
    wait_until(lambda: idle(engine), timeout=10, what="the executor to drop the request")
    assert engine.stats.tokens_total - before < LONG / 4


# -- errors of the executors behind it ------------------------------------------------------------

def _dead_address() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_an_executor_that_is_away_is_skipped_and_with_none_left_the_answer_is_503(executor):
    dead = _dead_address()
    with gateway_in_thread(Settings(ExecutorPool([dead, executor[1]]), MODEL)) as base_url:
        for _ in range(3):  # each executor comes first in turn: the dead one is passed over
            assert client(base_url).completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens == 2
        assert http("GET", base_url.removesuffix("/v1") + "/health", key=None)[1]["executors"] == \
            {dead: "UNAVAILABLE", executor[1]: "SERVING"}
    with gateway_in_thread(Settings(ExecutorPool([dead]), MODEL)) as base_url:
        with pytest.raises(openai.InternalServerError) as error:
            client(base_url).completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert error.value.status_code == 503 and error.value.type == "service_unavailable_error"
        assert http("GET", base_url.removesuffix("/v1") + "/health", key=None)[0] == 503


def test_a_full_executor_queue_is_429(model_dir):
    with Engine(EngineConfig(model_dir, budget_bytes=1 << 30, node_id="full", max_batch=1, max_queue=0)) as engine:
        server = serve(engine)
        try:
            with gateway_in_thread(Settings(ExecutorPool([f"127.0.0.1:{server.port}"]), MODEL)) as base_url:
                api = client(base_url)
                running = api.completions.create(model=MODEL, prompt="a", max_tokens=LONG, stream=True)
                next(iter(running))
                with pytest.raises(openai.RateLimitError) as error:
                    api.completions.create(model=MODEL, prompt="b", max_tokens=2)
                assert error.value.code == "resource_exhausted" and "max_queue" in error.value.message
                running.close()
                wait_until(lambda: idle(engine), timeout=10, what="the executor to drop the request")
        finally:
            server.stop(grace=1)


# -- the command a user runs ----------------------------------------------------------------------

@pytest.mark.slow
def test_swapmoe_http_serve_answers_completions_and_refuses_chat_without_a_chat_template(executor, model_dir,
                                                                                          tmp_path):
    (tmp_path / "api-key").write_text(KEY + "\n")
    gateway = spawn("http", ["http", "serve", "--executor", executor[1], "--port", "0", "--api-key-file",
                             str(tmp_path / "api-key"), "--tokenizer", str(model_dir)], timeout=120)
    try:
        base_url = f"http://{gateway.address}/v1"
        api = client(base_url)
        assert [m.id for m in api.models.list()] == [model_dir.name]  # named for the checkpoint
        expected, _ = grpc_generation(executor[1], "hello", 8)
        reply = api.completions.create(model=model_dir.name, prompt="hello", max_tokens=8, temperature=0)
        assert reply.choices[0].text == expected
        with pytest.raises(openai.BadRequestError) as error:
            api.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "hi"}])
        assert error.value.code == "no_chat_template" and "chat template" in error.value.message
        assert http("GET", f"http://{gateway.address}/health", key=None)[0] == 200
    finally:
        assert gateway.stop() == 0, "".join(gateway.output)



def test_the_gateway_dials_a_secured_executor_with_the_client_tls_and_token_flags(executor, tmp_path, monkeypatch):
    from swapmoe.cli.main import build_parser
    from swapmoe.cli.devcerts import make_dev_certs
    from swapmoe.rpc.security import client_from_args, server_from_args

    monkeypatch.delenv("SWAPMOE_TOKEN", raising=False)
    certs = tmp_path / "certs"
    make_dev_certs(certs)
    secured = serve(executor[0], security=server_from_args(build_parser().parse_args(
        ["executor", "serve", "--model", "m", "--budget", "1GiB", "--security", str(certs)]), "executor"))
    address = f"127.0.0.1:{secured.port}"
    try:
        def gateway_args(*flags):
            return client_from_args(build_parser().parse_args(["http", "serve", "--executor", address, *flags]),
                                    "client")

        with gateway_in_thread(Settings(ExecutorPool([address], gateway_args("--security", str(certs))),
                                        MODEL)) as base_url:
            assert client(base_url).completions.create(model=MODEL, prompt="a", max_tokens=3).usage.completion_tokens == 3
        no_token = gateway_args("--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
                                "--tls-key", str(certs / "client-key.pem"))
        with gateway_in_thread(Settings(ExecutorPool([address], no_token), MODEL)) as base_url:
            with pytest.raises(openai.AuthenticationError) as error:  # the executor's UNAUTHENTICATED
                client(base_url).completions.create(model=MODEL, prompt="a", max_tokens=3)
            assert "refused the gateway's credentials" in error.value.message
    finally:
        secured.stop(grace=1)


@pytest.mark.parametrize("code, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.UNAUTHENTICATED, 401),
    (grpc.StatusCode.PERMISSION_DENIED, 403), (grpc.StatusCode.NOT_FOUND, 404),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429), (grpc.StatusCode.UNAVAILABLE, 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500)])
def test_each_grpc_status_has_its_http_status_and_an_openai_error_body(code, status):
    from swapmoe.gateway.openai_api import error_from_rpc

    error = error_from_rpc(code, "stop[1]: has 300 characters; at most 256 are allowed", prompt_param="messages")
    assert error.status == status and error.code == code.name.lower()
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    assert error.param == "stop"  # the executor's field, as the OpenAI parameter the client sent
    assert error_from_rpc(code, "prompt: has 5000 tokens", prompt_param="messages").param == "messages"
