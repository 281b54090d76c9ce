"""``GET /metrics``: Prometheus text, every name starting ``lorart_``.

Two sources, one registry per app (never the process-global one, so several apps in a
process do not collide):

- the engine's own counters and gauges, read from one ``engine.metrics()`` snapshot at
  scrape time by a custom collector (the engine stays free of prometheus_client);
- what only the HTTP layer sees: requests by endpoint and status code, end-to-end
  latency and time to first token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Latency buckets for a CPU-sized model: tens of milliseconds to a minute.
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60)

# (engine metrics field, prometheus name, help, kind)
_ENGINE_SERIES = (
    ("prompt_tokens_total", "lorart_prompt_tokens", "Prompt tokens processed", "counter"),
    ("generation_tokens_total", "lorart_generation_tokens", "Tokens generated", "counter"),
    ("queue_depth", "lorart_queue_depth", "Requests waiting to be scheduled", "gauge"),
    ("running", "lorart_running_requests", "Requests currently running", "gauge"),
    ("resident_adapters", "lorart_resident_adapters",
     "Adapters resident in the layers' packed stacks", "gauge"),
    ("adapter_loads_total", "lorart_adapter_loads", "Adapter loads into a resident slot",
     "counter"),
    ("adapter_evictions_total", "lorart_adapter_evictions",
     "Adapters evicted from a resident slot", "counter"),
    ("adapter_refs", "lorart_adapter_references",
     "Outstanding adapter references held by requests", "gauge"),
    ("kv_blocks_total", "lorart_kv_blocks_capacity", "KV-cache blocks in the pool", "gauge"),
    ("kv_blocks_used", "lorart_kv_blocks_used", "KV-cache blocks in use", "gauge"),
    ("steps_total", "lorart_engine_steps", "Engine steps run", "counter"),
    ("step_seconds_total", "lorart_step_seconds", "Seconds spent in engine steps", "counter"),
    ("step_seconds_last", "lorart_step_seconds_last", "Duration of the last engine step",
     "gauge"),
    ("preemptions_total", "lorart_preemptions", "Requests preempted to free KV blocks",
     "counter"),
)


class _EngineCollector(Collector):
    """Turns one ``engine.metrics()`` snapshot into metric families at scrape time."""

    def __init__(self, engine):
        self._engine = engine

    def collect(self):
        snap = self._engine.metrics()
        requests = CounterMetricFamily("lorart_requests", "Finished engine requests by final "
                                       "status", labels=["status"])
        for status, count in sorted(snap.requests_total.items()):
            requests.add_metric([status], count)
        yield requests
        for field, name, doc, kind in _ENGINE_SERIES:
            value = getattr(snap, field)
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, doc, value=value)


class ServerMetrics:
    """The registry behind ``/metrics`` plus the HTTP layer's own series."""

    def __init__(self, engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine))
        self.http_requests = Counter(
            "lorart_http_requests", "HTTP requests by endpoint and status code",
            ["endpoint", "status_code"], registry=self.registry)
        self.latency = Histogram(
            "lorart_request_latency_seconds", "Time from request to last token, by endpoint",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram(
            "lorart_time_to_first_token_seconds", "Time from request to the first output",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
