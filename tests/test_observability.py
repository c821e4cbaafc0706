"""What an operator sees of a running executor: one structured line per request, its id in the
response and telemetry, Prometheus metrics in Prometheus's conventions, and errors that name the
failing field in google.rpc's error model."""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from swapmoe.core import logs
from swapmoe.executor.prometheus import serve_metrics
from swapmoe.planner_service.server import serve as serve_planner
from swapmoe.rpc import status, transport
from swapmoe.v1 import executor_pb2 as epb, executor_pb2_grpc, planner_pb2 as ppb, planner_pb2_grpc
from swapmoe.v1 import telemetry_pb2 as tpb
from tests.polling import wait_until
from tests.serving import own_engine, serving

NODE = "observed-node"


@pytest.fixture(scope="module")
def observed_engine(tiny_model_dir):
    with own_engine(tiny_model_dir, NODE) as engine:
        yield engine


@pytest.fixture(scope="module")
def stub(observed_engine):
    with serving(observed_engine) as channel:
        yield executor_pb2_grpc.ExecutorServiceStub(channel)


@pytest.fixture
def request_lines():
    """The JSON lines the ``swapmoe.requests`` logger writes meanwhile, parsed (a list that grows)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json"))
    logger = logging.getLogger(logs.REQUESTS_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def line_for(request_lines, request_id: str) -> dict:
    return wait_until(lambda: next((l for l in request_lines() if l["request_id"] == request_id), None),
                      timeout=10, what=f"the request line of {request_id}")


def field_violations(error: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    status = rpc_status.from_call(error)
    assert status is not None, "the status carries no google.rpc.Status"
    violations = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request), detail.type_url
        violations.extend(bad_request.field_violations)
    return violations


# --- one line per request ---------------------------------------------------------------------
def test_a_finished_generation_leaves_one_json_line_with_its_id_tokens_timings_and_outcome(stub, request_lines):
    chunks = list(stub.Generate(epb.GenerateRequest(text="def add(a, b):", max_new_tokens=4, request_id="req-42"),
                                timeout=30))
    line = line_for(request_lines, "req-42")
    assert [l["request_id"] for l in request_lines()].count("req-42") == 1
    assert line["level"] == "INFO" and line["logger"] == "swapmoe.requests" and "req-42 OK length" in line["message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", line["ts"])
    last = chunks[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (last.usage.prompt_tokens, 4)
    assert (line["finish_reason"], line["code"], line["error"]) == ("length", "OK", "")
    assert 0 < line["time_to_first_token_s"] <= line["total_s"]
    assert line["tokens_per_s"] == pytest.approx(4 / line["total_s"], rel=0.01)


def test_the_request_id_comes_back_on_the_first_and_last_chunk_and_one_is_made_up_when_missing(stub, request_lines):
    given = list(stub.Generate(epb.GenerateRequest(text="x = 1", max_new_tokens=3, request_id="mine"), timeout=30))
    assert given[0].request_id == given[-1].request_id == "mine"
    assert all(c.request_id == "" for c in given[1:-1])
    made = list(stub.Generate(epb.GenerateRequest(text="x = 1", max_new_tokens=3), timeout=30))
    assert re.fullmatch(r"[0-9a-f]{32}", made[0].request_id) and made[-1].request_id == made[0].request_id
    assert line_for(request_lines, made[0].request_id)["completion_tokens"] == 3


def test_a_request_its_client_cancels_is_logged_as_cancelled_with_the_tokens_it_got(stub, request_lines):
    call = stub.Generate(epb.GenerateRequest(text="import os", max_new_tokens=1000, request_id="leaver"), timeout=30)
    next(call)
    call.cancel()
    line = line_for(request_lines, "leaver")
    assert (line["code"], line["finish_reason"]) == ("CANCELLED", "cancelled")
    assert 1 <= line["completion_tokens"] < 1000 and line["time_to_first_token_s"] > 0


def test_a_refused_request_is_logged_with_its_status_and_the_reason(stub, request_lines):
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(epb.GenerateRequest(text="hi", max_new_tokens=10**6, request_id="too-long"), timeout=10))
    line = line_for(request_lines, "too-long")
    assert (line["code"], line["finish_reason"], line["completion_tokens"]) == ("INVALID_ARGUMENT", "error", 0)
    assert line["error"].startswith("max_new_tokens:") and line["time_to_first_token_s"] is None


def test_a_request_id_that_would_forge_log_lines_is_refused_and_logged_escaped(stub, request_lines):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(epb.GenerateRequest(text="hi", request_id="a\nforged"), timeout=10))
    assert [v.field for v in field_violations(error.value)] == ["request_id"]
    assert line_for(request_lines, repr("a\nforged"))["code"] == "INVALID_ARGUMENT"


def test_request_finished_events_carry_the_request_id(stub):
    events = stub.Subscribe(epb.SubscribeRequest(topics=[tpb.TOPIC_EVENTS]), timeout=30)
    try:
        list(stub.Generate(epb.GenerateRequest(text="hello", max_new_tokens=2, request_id="evented"), timeout=30))
        event = next(e.event for e in events if e.event.kind == tpb.Event.KIND_REQUEST_FINISHED)
    finally:
        events.cancel()
    assert event.request_id == "evented" and event.message.startswith("evented OK length: ")


# --- structured logs ---------------------------------------------------------------------------
@pytest.fixture
def root_logger():
    """The root logger's handlers and level, put back after the test."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger(logs.REQUESTS_LOGGER).level)
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger(logs.REQUESTS_LOGGER).setLevel(saved[2])


def test_json_logs_are_one_object_per_line_with_extra_fields_as_keys_and_quiet_unless_verbose(root_logger):
    stream = io.StringIO()
    logs.configure("json", verbose=False, stream=stream)
    logs.configure("json", verbose=False, stream=stream)  # a second call replaces the first handler
    logging.getLogger("swapmoe.executor.loader").info("not shown unless verbose")
    logging.getLogger("swapmoe.executor.loader").warning("slow disk: %d MB/s", 12, extra={"device": "sda"})
    logging.getLogger(logs.REQUESTS_LOGGER).info("r1 OK length", extra={"request_id": "r1", "total_s": 0.5})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(l["level"], l["logger"], l["message"]) for l in lines] == [
        ("WARNING", "swapmoe.executor.loader", "slow disk: 12 MB/s"), ("INFO", "swapmoe.requests", "r1 OK length")]
    assert lines[0]["device"] == "sda" and (lines[1]["request_id"], lines[1]["total_s"]) == ("r1", 0.5)
    assert list(lines[0])[:4] == ["ts", "level", "logger", "message"]


def test_text_logs_are_for_people_and_an_unknown_format_is_refused(root_logger):
    stream = io.StringIO()
    logs.configure("text", verbose=True, stream=stream)
    logging.getLogger("swapmoe.planner").info("planning %s", "now", extra={"node": "n1"})
    assert stream.getvalue().endswith(" INFO swapmoe.planner: planning now\n")
    with pytest.raises(ValueError, match="text, json"):
        logs.configure("yaml")


# --- Prometheus --------------------------------------------------------------------------------
def scrape(engine) -> list:
    server = serve_metrics(engine, "127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    return list(text_string_to_metric_families(text))


NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # no colons: Prometheus keeps them for recording rules
TIME_WORDS = re.compile(r"time|latency|duration")
NOT_BASE_UNITS = re.compile(r"_(ms|ns|us|milliseconds|microseconds|nanoseconds|minutes|hours|kb|mb|gb|kib|mib|gib)"
                            r"(_|$)")
STANDARD = ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_gc_objects_collected",
            "python_info")


def test_every_metric_is_labelled_by_model_and_node_and_named_in_prometheus_conventions(stub, observed_engine):
    list(stub.Generate(epb.GenerateRequest(text="metrics", max_new_tokens=4), timeout=30))
    families = scrape(observed_engine)
    names = {f.name for f in families}
    assert set(STANDARD) <= names, "the default process and Python collectors are served"
    for family in families:
        assert NAME.fullmatch(family.name), family.name
        assert family.name.startswith(("swapmoe_", "process_", "python_")), family.name
        assert not NOT_BASE_UNITS.search(family.name), f"{family.name}: use base units (seconds, bytes)"
        if TIME_WORDS.search(family.name):
            assert family.name.endswith("_seconds"), family.name
        if "memory" in family.name or "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name
        for sample in family.samples:
            assert sample.labels["model"] == observed_engine.config.model_dir.name, sample
            assert sample.labels["node"] == NODE, sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
    values = {(s.name, s.labels.get("finish_reason"), s.labels.get("code")): s.value
              for f in families for s in f.samples}
    assert values["swapmoe_generation_tokens_total", None, None] >= 4
    assert values["swapmoe_requests_total", "length", "OK"] >= 1
    assert values["swapmoe_e2e_request_latency_seconds_count", None, None] >= 1
    assert values["swapmoe_prompt_tokens_total", None, None] >= 1
    assert values["process_resident_memory_bytes", None, None] > 0


@pytest.mark.slow
def test_the_process_collectors_are_kept_for_each_of_two_executors_in_one_process(observed_engine, tiny_model_dir):
    with own_engine(tiny_model_dir, "second-node") as second:
        first_names = {f.name for f in scrape(observed_engine)}
        second_families = scrape(second)
    assert {f.name for f in second_families} == first_names
    assert {s.labels["node"] for f in second_families for s in f.samples} == {"second-node"}


# --- rich error details ------------------------------------------------------------------------
@pytest.mark.parametrize("request_, field", [
    (epb.GenerateRequest(text="hi", sampling=epb.SamplingParams(temperature=1000)), "sampling.temperature"),
    (epb.GenerateRequest(text="hi", max_new_tokens=5000), "max_new_tokens"),
    (epb.GenerateRequest(text=" "), "prompt.text"),
])
def test_an_invalid_request_names_its_field_in_a_bad_request_detail_and_keeps_the_plain_message(stub, request_,
                                                                                              field):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request_, timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = field_violations(error.value)
    assert violation.field == field
    assert error.value.details() == f"{field}: {violation.description}"


def test_unary_calls_name_their_field_too_and_errors_of_no_field_carry_no_details(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.SetBudget(epb.SetBudgetRequest(budget_bytes=1), timeout=10)
    assert [v.field for v in field_violations(error.value)] == ["budget_bytes"]
    code, message, trailer = status.describe(ValueError("top_k and top_p disagree"), "Generate")
    assert (code, message, trailer) == (grpc.StatusCode.INVALID_ARGUMENT, "top_k and top_p disagree", ())


def test_the_asyncio_planner_names_the_field_the_same_way_and_a_relay_passes_it_on():
    server, _ = serve_planner()
    try:
        with transport.channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as error:
                planner_pb2_grpc.PlannerServiceStub(channel).GetPlanStatus(ppb.PlanStatusRequest(page_size=10**6),
                                                                           timeout=10)
    finally:
        server.stop(grace=1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(error.value)] == ["page_size"]
    # A server whose upstream call failed (the control node relaying the planner) ends its own call
    # with the upstream's details under its own message.
    code, message, trailer = status.describe(error.value, "PushPlan")
    relayed = status_pb2.Status.FromString(dict(trailer)["grpc-status-details-bin"])
    assert (code, relayed.code) == (grpc.StatusCode.INVALID_ARGUMENT, code.value[0])
    assert relayed.message == message == f"upstream call failed: INVALID_ARGUMENT: {error.value.details()}"
    assert list(relayed.details) == list(rpc_status.from_call(error.value).details)
