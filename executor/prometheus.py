"""Prometheus metrics for an executor: vLLM's names in Prometheus's own conventions.

Names are vLLM's (``vllm:time_to_first_token_seconds`` -> ``swapmoe_time_to_first_token_seconds``)
so its dashboards port by a prefix, but with an underscore: Prometheus reserves colons for
recording rules, so exporters should not use them. Base units (``_seconds``, ``_bytes``),
counters ending ``_total``. Every series is labelled ``model`` (the checkpoint directory's name,
as the planner labels executors) and ``node`` (the node id), so several executors on one host,
or behind one scrape target, stay apart. The process and Python collectors
(``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``python_gc_*``,
``python_info``) are served too, with the same labels.

Values are read from the engine when Prometheus scrapes, so serving pays nothing for them
beyond the counters and histograms ``ServingStats`` already keeps.
"""

from __future__ import annotations

import socketserver
import ssl
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, Metric, PlatformCollector, ProcessCollector
from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "swapmoe_"


class EngineCollector:
    """The engine's serving, memory, expert-load and plan metrics, read at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield from self._latencies(engine.stats)
        yield from self._requests(engine.stats)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Generation requests waiting for their turn.",
                                value=engine.queue_depth)
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Generation requests being served.",
                                value=engine.running)
        memory = engine.memory()
        for name, value, doc in (
            ("memory_budget_bytes", memory.budget_bytes, "The executor's memory budget."),
            ("memory_accounted_bytes", memory.accounted_bytes, "Dense weights + expert slots + KV cache and "
                                                               "activation reserves."),
            ("memory_expert_bytes", memory.expert_bytes, "Expert slots and staging buffers."),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        loads = engine.load_counters()
        yield CounterMetricFamily(PREFIX + "expert_loads", "Experts loaded into slots.", value=loads.loads)
        yield CounterMetricFamily(PREFIX + "expert_load_bytes", "Bytes read to load experts.", value=loads.nbytes)
        yield CounterMetricFamily(PREFIX + "expert_load_seconds", "Time spent loading experts.", value=loads.seconds)
        yield GaugeMetricFamily(PREFIX + "plan_version", "Version of the plan in force.", value=engine.plan.version)
        failures, unsaved = engine.state_writes
        yield CounterMetricFamily(PREFIX + "state_write_failures", "Writes to the state directory that failed "
                                                                   "(each is retried).", value=failures)
        yield GaugeMetricFamily(PREFIX + "state_unsaved_files", "State files (the plan, the node secret) not "
                                                                "written yet: a restart now resumes older ones.",
                                value=unsaved)

    @staticmethod
    def _latencies(stats):
        ttft, ttft_sum, itl, itl_sum = stats.histograms()
        yield HistogramMetricFamily(PREFIX + "time_to_first_token_seconds",
                                    "Time from a request's first prefill to its first token.",
                                    buckets=ttft, sum_value=ttft_sum)
        yield HistogramMetricFamily(PREFIX + "inter_token_latency_seconds", "Time between two streamed tokens.",
                                    buckets=itl, sum_value=itl_sum)
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.",
                                  value=stats.snapshot()["tokens_total"])

    @staticmethod
    def _requests(stats):
        outcomes, prompt_tokens, e2e, e2e_sum = stats.requests()
        requests = CounterMetricFamily(PREFIX + "requests", "Generate calls that ended, by finish reason and "
                                                            "gRPC status code.", labels=("finish_reason", "code"))
        for (finish_reason, code), count in sorted(outcomes.items()):
            requests.add_metric((finish_reason, code), count)
        yield requests
        yield CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens of the Generate calls that ended.",
                                  value=prompt_tokens)
        yield HistogramMetricFamily(PREFIX + "e2e_request_latency_seconds",
                                    "Time from a Generate call's arrival to its end, queue included.",
                                    buckets=e2e, sum_value=e2e_sum)


class ConstantLabels:
    """Another collector's metrics with ``labels`` added to every sample (Prometheus's client
    has constant labels for metrics it owns, not for collectors like the process one)."""

    def __init__(self, collector, labels: dict[str, str]):
        self.collector, self.labels = collector, labels

    def collect(self):
        for family in self.collector.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield labelled


def model_name(engine) -> str:
    """The ``model`` label: the checkpoint directory's name, as ``swapmoe executor serve`` labels executors."""
    return Path(engine.config.model_dir).name or "model"


def metrics_registry(engine) -> CollectorRegistry:
    """A registry of its own (several executors may share a process, as in the tests) holding the
    engine's metrics and the default process, platform and GC collectors, all labelled."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(EngineCollector(engine))
    ProcessCollector(registry=collectors)
    PlatformCollector(registry=collectors)
    GCCollector(registry=collectors)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConstantLabels(collectors, {"model": model_name(engine), "node": engine.config.node_id}))
    return registry


CONNECTION_TIMEOUT_S = 10.0  # a scrape (TLS handshake included) that sends nothing for this long is dropped


class _Handler(WSGIRequestHandler):
    """Quiet (Prometheus scrapes every few seconds); the TLS handshake happens here, on the
    connection's own thread and under its timeout, never on the thread that accepts connections,
    so a client that connects and stays silent holds up no other scrape."""

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def log_message(self, *args) -> None:
        pass


class _MetricsServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def get_request(self):
        connection, address = super().get_request()
        connection.settimeout(CONNECTION_TIMEOUT_S)
        return connection, address

    def handle_error(self, request, client_address) -> None:
        pass  # a client that left or failed its handshake: nothing to report


def serve_metrics(engine, host: str = "127.0.0.1", port: int = 0, tls=None):
    """Serve ``/metrics`` on a daemon thread, a thread per scrape; returns the HTTP server
    (``server_port``). With ``tls`` (the executor's ``swapmoe.rpc.tls.TlsFiles``) it is HTTPS with the
    executor's certificate and, when ``tls.ca`` is set, requires a client certificate signed by it,
    as the gRPC port does."""
    server = make_server(host, port, make_wsgi_app(metrics_registry(engine)), _MetricsServer, handler_class=_Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            context.load_verify_locations(cafile=str(tls.ca))
            context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
