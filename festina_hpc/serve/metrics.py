"""Prometheus exposition of a serving engine's counters (``GET /metrics``).

A collector reads ``SimulatedEngine.stats()`` at scrape time, so busy/idle
time and energy are exact at each scrape without a background updater. Each
server has its own ``CollectorRegistry`` (no process-global registry that
tests would have to reset). Names follow Prometheus conventions, units in
names; every series carries ``model`` and ``gpu`` labels.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from festina_hpc.serve.engine import SimulatedEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector(Collector):
    def __init__(self, engine: SimulatedEngine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        labels = ["model", "gpu"]
        values = [self.engine.model, self.engine.gpu_type]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield counter("festina_serve_requests", "Requests received.", s.requests_received)
        yield counter("festina_serve_requests_finished", "Requests that generated all their tokens.",
                      s.requests_finished)
        yield counter("festina_serve_requests_aborted", "Requests cancelled by the client or by shutdown.",
                      s.requests_aborted)
        yield counter("festina_serve_prompt_tokens", "Prompt tokens received (whitespace words or token ids).",
                      s.prompt_tokens)
        yield counter("festina_serve_generation_tokens", "Output tokens generated.", s.generated_tokens)
        yield counter("festina_serve_steps", "Engine steps (forward passes).", s.steps)
        yield counter("festina_serve_clamped_lookups", "Profile lookups answered at the table's edge.",
                      s.clamped_lookups)
        yield counter("festina_serve_busy_seconds", "Time spent in steps (model time).", s.busy_s)
        yield counter("festina_serve_idle_seconds", "Time with nothing to run (model time).", s.idle_s)
        energy = CounterMetricFamily("festina_serve_energy_joules",
                                     "Estimated GPU energy from the profile's power, by state.",
                                     labels=[*labels, "state"])
        energy.add_metric([*values, "busy"], s.busy_energy_j)
        energy.add_metric([*values, "idle"], s.idle_energy_j)
        yield energy
        yield gauge("festina_serve_power_watts", "Estimated GPU power now, over the instance's GPUs.", s.power_w)
        yield gauge("festina_serve_running", "Sequences admitted (prefilling or decoding).", s.running)
        yield gauge("festina_serve_waiting", "Requests waiting for admission.", s.waiting)
        yield gauge("festina_serve_sm_pct", "SM share (MPS active-thread percentage) in force.", s.settings.sm_pct)
        yield gauge("festina_serve_clock_mhz", "GPU SM clock the engine is paced at.", s.settings.clock_mhz)
        yield gauge("festina_serve_batch_cap", "Max sequences admitted at once.", s.settings.batch_cap)
        yield gauge("festina_serve_chunk_tokens", "Prompt tokens one step may prefill.", s.settings.chunk_tokens)


def engine_registry(engine: SimulatedEngine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
