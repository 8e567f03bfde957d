"""festina_hpc.accounting.metrics: the exposition text of a snapshot, figures left out when unknown, a fresh
snapshot per scrape, and bad figures refused naming them."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from festina_hpc.accounting.metrics import (
    GpuFigures,
    MetricsError,
    MetricsSnapshot,
    ModelFigures,
    ShareFigures,
    build_registry,
    exposition,
)

SNAPSHOT = MetricsSnapshot(
    gpus=(GpuFigures("n01", 0, 312.5, 1.5e6), GpuFigures("n01", 1, 71.0, 2.0e5), GpuFigures("n02", 0, None, 9.0)),
    models=(ModelFigures("llama-3.1-8b", 200.0, 9000.0, 0.6, 5), ModelFigures("mistral-7b", 75.0, 900.0, None, 0)),
    decisions_per_s=12.5, decisions=100, powered_nodes=3, nodes=4)


def samples(snapshot: MetricsSnapshot) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = exposition(build_registry(snapshot))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_exposition_text_of_a_snapshot() -> None:
    body, content_type = exposition(build_registry(SNAPSHOT))
    text = body.decode()
    assert content_type.startswith("text/plain; version=")
    for line in ('# TYPE festina_gpu_power_watts gauge', 'festina_gpu_power_watts{gpu="0",node="n01"} 312.5',
                 '# TYPE festina_gpu_energy_joules_total counter',
                 'festina_gpu_energy_joules_total{gpu="1",node="n01"} 200000.0',
                 'festina_model_power_watts{model="mistral-7b"} 75.0',
                 'festina_model_energy_joules_total{model="llama-3.1-8b"} 9000.0',
                 'festina_model_slo_attainment_ratio{model="llama-3.1-8b"} 0.6',
                 'festina_model_requests_total{model="llama-3.1-8b"} 5.0',
                 'festina_decisions_per_second 12.5', 'festina_decisions_total 100.0',
                 'festina_nodes_powered 3.0', 'festina_nodes 4.0'):
        assert line in text.splitlines(), line
    assert "process_" not in text and "python_" not in text  # festina's metrics only


def test_unknown_figures_are_left_out_not_zero() -> None:
    got = samples(SNAPSHOT)
    assert ("festina_gpu_power_watts", (("gpu", "0"), ("node", "n02"))) not in got
    assert got[("festina_gpu_energy_joules_total", (("gpu", "0"), ("node", "n02")))] == 9.0
    assert ("festina_model_slo_attainment_ratio", (("model", "mistral-7b"),)) not in got
    empty = samples(MetricsSnapshot())
    assert empty == {}


def test_each_scrape_reads_the_current_snapshot() -> None:
    state = {"powered": 3}
    registry = build_registry(lambda: MetricsSnapshot(powered_nodes=state["powered"]))
    assert b"festina_nodes_powered 3.0" in exposition(registry)[0]
    state["powered"] = 1
    assert b"festina_nodes_powered 1.0" in exposition(registry)[0]


@pytest.mark.parametrize(("snapshot", "message"), [
    (MetricsSnapshot(gpus=(GpuFigures("n01", 0, -1.0, 0.0),)),
     "metrics: gpus[node=n01, gpu=0].power_w = -1.0 must be a finite, non-negative number"),
    (MetricsSnapshot(models=(ModelFigures("m", 1.0, 1.0, 1.5),)),
     "metrics: models[m].slo_attainment = 1.5 must be in [0, 1]"),
    (MetricsSnapshot(decisions_per_s=float("nan")), "metrics: festina_decisions_per_second = nan must be"),
    (MetricsSnapshot(gpus=(GpuFigures("n01", 0, 1.0, 1.0), GpuFigures("n01", 0, 2.0, 2.0))),
     "metrics: gpus[node=n01, gpu=0] appears twice"),
    (MetricsSnapshot(shares=(ShareFigures("n01", 0, 7, 50.0, 130.0),)),
     "metrics: shares[node=n01, gpu=0, job=7].wanted_sm_pct = 130.0 must be in [0, 100]"),
])
def test_bad_figures_are_refused_naming_them(snapshot: MetricsSnapshot, message: str) -> None:
    with pytest.raises(MetricsError) as info:
        exposition(build_registry(snapshot))
    assert str(info.value).startswith(message)


def test_a_jobs_share_and_the_share_wanted_instead() -> None:
    got = samples(MetricsSnapshot(shares=(ShareFigures("n01", 0, 7, 50.0, 30.0), ShareFigures("n01", 0, 8, 40.0))))
    key = (("gpu", "0"), ("job", "7"), ("node", "n01"))
    assert got[("festina_job_sm_share_percent", key)] == 50.0
    assert got[("festina_job_wanted_sm_share_percent", key)] == 30.0
    assert got[("festina_job_sm_share_percent", (("gpu", "0"), ("job", "8"), ("node", "n01")))] == 40.0
    assert ("festina_job_wanted_sm_share_percent", (("gpu", "0"), ("job", "8"), ("node", "n01"))) not in got
