"""Prometheus metrics for an executor, named as vLLM's (``vllm:...``) with our prefix.

Values are read from the engine when Prometheus scrapes, so serving pays nothing for
them beyond the histograms ``ServingStats`` already keeps.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "swapmoe:"


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        snap = engine.stats.snapshot()
        ttft, ttft_sum, itl, itl_sum = engine.stats.histograms()
        yield HistogramMetricFamily(PREFIX + "time_to_first_token_seconds", "Time to first token, per request.",
                                    buckets=ttft, sum_value=ttft_sum)
        yield HistogramMetricFamily(PREFIX + "inter_token_latency_seconds", "Time between two streamed tokens.",
                                    buckets=itl, sum_value=itl_sum)
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.", value=snap["tokens_total"])
        yield CounterMetricFamily(PREFIX + "request_success", "Generations that finished.",
                                  value=snap["requests_total"])
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
            ("process_resident_memory_bytes", memory.process_rss_bytes, "Resident memory of the whole process."),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        loads = engine.load_counters()
        yield CounterMetricFamily(PREFIX + "expert_loads", "Experts loaded into slots.", value=loads.loads)
        yield CounterMetricFamily(PREFIX + "expert_load_bytes", "Bytes read to load experts.", value=loads.nbytes)
        yield CounterMetricFamily(PREFIX + "expert_load_seconds", "Time spent loading experts.", value=loads.seconds)
        yield GaugeMetricFamily(PREFIX + "plan_version", "Version of the plan in force.", value=engine.plan.version)


def serve_metrics(engine, host: str = "127.0.0.1", port: int = 0):
    """Serve ``/metrics`` over HTTP on a daemon thread; returns the HTTP server (``server_port``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
