"""Prometheus metrics built from figures passed in: power and energy per GPU and per model, SLO attainment,
decisions per second, powered nodes, each serving job's SM share and the one its node's controller wants.

Pure: nothing here reads NVML, the database or a clock. festinad and festina-node each build a
``MetricsSnapshot`` from what they already hold and mount the registry on their HTTP server:
``build_registry(source)`` takes a snapshot, or a function returning one that every scrape calls
(so the figures are current without re-registering anything), and ``exposition(registry)`` gives
the body and content type of a ``/metrics`` answer. Units are Prometheus base units (watts,
joules, ratios); energy is a counter (it only grows), power a gauge. A figure of None is left out
rather than reported as 0; a negative or non-finite one is a ``FestinaError`` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from festina_hpc.errors import FestinaError


class MetricsError(FestinaError):
    """A figure handed to the metrics is not a finite, non-negative number, or a label set repeats."""


@dataclass(frozen=True)
class GpuFigures:
    node: str
    gpu_index: int
    power_w: float | None  # board power now
    energy_j: float | None  # energy counted since the exporter started (or NVML's counter): only grows
    clock_mhz: float | None = None  # the SM clock locked on it; None: driver default or not known


@dataclass(frozen=True)
class ModelFigures:
    model: str
    power_w: float | None  # its instances' share of their GPUs' power now
    energy_j: float | None  # attributed energy, only grows
    slo_attainment: float | None  # fraction of its finished requests that met their SLOs (0..1)
    requests: int | None = None  # finished requests counted into slo_attainment, only grows


@dataclass(frozen=True)
class ShareFigures:
    """A job's MPS share on one GPU: the one it started with, and the one festina-node's controller wants."""

    node: str
    gpu_index: int
    job_id: int
    sm_pct: float
    # None: none other. A running instance's share is fixed, so a wanted one takes a restart at it (festinad's).
    wanted_sm_pct: float | None = None


@dataclass(frozen=True)
class MetricsSnapshot:
    gpus: tuple[GpuFigures, ...] = ()
    models: tuple[ModelFigures, ...] = ()
    decisions_per_s: float | None = None  # policy decisions per second over the exporter's recent window
    decisions: int | None = None  # policy decisions so far, only grows
    powered_nodes: int | None = None
    nodes: int | None = None
    shares: tuple[ShareFigures, ...] = ()


def _check(where: str, value: float | None, *, high: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 or (
            high is not None and value > high):
        bounds = f"in [0, {high:g}]" if high is not None else "a finite, non-negative number"
        raise MetricsError(f"metrics: {where} = {value!r} must be {bounds}")
    return float(value)


def _families(snapshot: MetricsSnapshot) -> list[Metric]:
    gpu_power = GaugeMetricFamily("festina_gpu_power_watts", "GPU board power.", labels=["node", "gpu"])
    gpu_energy = CounterMetricFamily("festina_gpu_energy_joules", "GPU energy.", labels=["node", "gpu"])
    gpu_clock = GaugeMetricFamily("festina_gpu_locked_clock_hertz",
                                  "SM clock locked on the GPU (absent: the driver's default, or not known).",
                                  labels=["node", "gpu"])
    seen: set[tuple[str, ...]] = set()
    for gpu in snapshot.gpus:
        labels = [gpu.node, str(gpu.gpu_index)]
        where = f"gpus[node={gpu.node}, gpu={gpu.gpu_index}]"
        if tuple(labels) in seen:
            raise MetricsError(f"metrics: {where} appears twice")
        seen.add(tuple(labels))
        if (power := _check(f"{where}.power_w", gpu.power_w)) is not None:
            gpu_power.add_metric(labels, power)
        if (energy := _check(f"{where}.energy_j", gpu.energy_j)) is not None:
            gpu_energy.add_metric(labels, energy)
        if (clock := _check(f"{where}.clock_mhz", gpu.clock_mhz)) is not None:
            gpu_clock.add_metric(labels, clock * 1e6)
    model_power = GaugeMetricFamily("festina_model_power_watts", "Power of a model's instances (their GPU shares).",
                                    labels=["model"])
    model_energy = CounterMetricFamily("festina_model_energy_joules", "GPU energy attributed to a model.",
                                       labels=["model"])
    attainment = GaugeMetricFamily("festina_model_slo_attainment_ratio",
                                   "Fraction of a model's finished requests that met their TTFT and TBT SLOs.",
                                   labels=["model"])
    requests = CounterMetricFamily("festina_model_requests", "A model's finished requests.", labels=["model"])
    models: set[str] = set()
    for model in snapshot.models:
        where = f"models[{model.model}]"
        if model.model in models:
            raise MetricsError(f"metrics: {where} appears twice")
        models.add(model.model)
        if (power := _check(f"{where}.power_w", model.power_w)) is not None:
            model_power.add_metric([model.model], power)
        if (energy := _check(f"{where}.energy_j", model.energy_j)) is not None:
            model_energy.add_metric([model.model], energy)
        if (ratio := _check(f"{where}.slo_attainment", model.slo_attainment, high=1.0)) is not None:
            attainment.add_metric([model.model], ratio)
        if (count := _check(f"{where}.requests", model.requests)) is not None:
            requests.add_metric([model.model], count)
    families: list[Metric] = [gpu_power, gpu_energy, gpu_clock, model_power, model_energy, attainment, requests,
                              *_share_families(snapshot.shares)]
    for name, help_text, value, kind in (
            ("festina_decisions_per_second", "Policy decisions per second.", snapshot.decisions_per_s, "gauge"),
            ("festina_decisions", "Policy decisions.", snapshot.decisions, "counter"),
            ("festina_nodes_powered", "Nodes powered on.", snapshot.powered_nodes, "gauge"),
            ("festina_nodes", "Nodes festina manages.", snapshot.nodes, "gauge")):
        checked = _check(name, value)
        if checked is not None:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            families.append(family(name, help_text, value=checked))
    return families


def _share_families(shares: tuple[ShareFigures, ...]) -> list[Metric]:
    labels = ["node", "gpu", "job"]
    share = GaugeMetricFamily("festina_job_sm_share_percent", "A serving job's MPS share, fixed at its start.",
                              labels=labels)
    wanted = GaugeMetricFamily("festina_job_wanted_sm_share_percent",
                               "The MPS share festina-node's controller wants for a job instead (a restart at it).",
                               labels=labels)
    seen: set[tuple[str, ...]] = set()
    for fig in shares:
        key = [fig.node, str(fig.gpu_index), str(fig.job_id)]
        where = f"shares[node={fig.node}, gpu={fig.gpu_index}, job={fig.job_id}]"
        if tuple(key) in seen:
            raise MetricsError(f"metrics: {where} appears twice")
        seen.add(tuple(key))
        if (pct := _check(f"{where}.sm_pct", fig.sm_pct, high=100.0)) is not None:
            share.add_metric(key, pct)
        if (want := _check(f"{where}.wanted_sm_pct", fig.wanted_sm_pct, high=100.0)) is not None:
            wanted.add_metric(key, want)
    return [share, wanted]


class SnapshotCollector(Collector):
    """A collector whose every scrape asks ``source`` for the current snapshot."""

    def __init__(self, source: Callable[[], MetricsSnapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from _families(self._source())


def build_registry(source: MetricsSnapshot | Callable[[], MetricsSnapshot]) -> CollectorRegistry:
    """A registry of festina's metrics only (no process or platform collectors) over ``source``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source if callable(source) else (lambda: source)))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and Content-Type of a ``/metrics`` answer."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


__all__ = ["GpuFigures", "MetricsError", "MetricsSnapshot", "ModelFigures", "ShareFigures", "SnapshotCollector",
           "build_registry", "exposition"]
