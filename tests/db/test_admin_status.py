"""festina_hpc.admin.status on SQLite and PostgreSQL: instances per GPU, power now, SLO attainment per model."""

from __future__ import annotations

import json
from datetime import timedelta

from festina_hpc.admin.status import bench_status, collect, render_text, to_json
from festina_hpc.db.ingest import EnergyReading
from festina_hpc.db.node_reports import READING_STALE_S
from festina_hpc.db.store import Store
from festina_hpc.policy.types import GpuSettings, InstancePhase
from festina_hpc.slurm.types import SlurmNode
from tests.db.conftest import T0, at, make_cluster, make_outcome


def test_snapshot_of_a_small_cluster(store: Store) -> None:
    gpus = make_cluster(store)
    a = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=T0, sm_pct=40.0, batch_cap=64,
                              memory_fraction=0.3, slurm_job_id=101)
    b = store.create_instance("mistral-7b", [gpus[("n01", 0)]], at=T0, sm_pct=30.0, batch_cap=64,
                              memory_fraction=0.3)
    gone = store.create_instance("mistral-7b", [gpus[("n02", 1)]], at=T0, sm_pct=30.0, batch_cap=64,
                                 memory_fraction=0.3)
    store.set_phase(a, InstancePhase.READY, at=T0)
    store.set_phase(gone, InstancePhase.STOPPED, at=T0)
    store.record_energy([EnergyReading(gpus[("n01", 0)], at(10), 1000.0, power_w=210.0),
                         EnergyReading(gpus[("n01", 0)], at(20), 3000.0, power_w=250.0)])
    store.record_requests([make_outcome(arrival_at=at(k), first_token_at=None, finish_at=None, slo_met=k != 3)
                           for k in range(4)]
                          + [make_outcome(model="mistral-7b", arrival_at=at(5), first_token_at=None,
                                          finish_at=None),
                             make_outcome(arrival_at=T0 - timedelta(hours=1), first_token_at=None,
                                          finish_at=None)])  # outside the window
    snapshot = collect(store.engine, now=at(30), window_s=300.0)
    assert [n.name for n in snapshot.nodes] == ["n01", "n02"] and snapshot.gpu_count == 4
    gpu0 = snapshot.nodes[0].gpus[0]
    assert [(i.id, i.phase, i.sm_pct) for i in gpu0.instances] == [(a, "ready", 40.0), (b, "loading", 30.0)]
    assert gpu0.power_w == 250.0 and gpu0.sm_pct_allocated == 70.0
    assert snapshot.nodes[1].gpus[1].instances == ()  # stopped instances are not shown
    attainment = {m.model: (m.requests, m.slo_met, m.attainment) for m in snapshot.models}
    assert attainment == {"llama-3.1-8b": (4, 3, 0.75), "mistral-7b": (1, 1, 1.0)}
    text = render_text(snapshot)
    assert "n01" in text and f"#{a}" in text and "75.0%" in text and "(idle)" in text
    assert json.loads(json.dumps(to_json(snapshot)))["gpus"] == 4


def test_status_shows_what_the_node_reports(store: Store) -> None:
    """The node's locked clock and applied share win over festinad's plan; a stale reading is unknown."""
    gpus = make_cluster(store)
    a = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=T0, sm_pct=40.0, batch_cap=64,
                              memory_fraction=0.3, slurm_job_id=101)
    b = store.create_instance("mistral-7b", [gpus[("n01", 1)]], at=at(10), sm_pct=30.0, batch_cap=64,
                              memory_fraction=0.3, slurm_job_id=102)
    # What festina-node's DbEnergySink.settings writes: shares keyed by Slurm job id, changes only.
    store.record_settings(gpus[("n01", 0)], GpuSettings(clock_mhz=1200, sm_pct={101: 50.0}), at=at(4))
    store.record_settings(gpus[("n01", 0)], GpuSettings(clock_mhz=900), at=at(6))
    store.record_settings(gpus[("n01", 1)], GpuSettings(clock_mhz=1000), at=at(5))  # its job before b: reset since
    store.record_energy([EnergyReading(gpus[("n01", 0)], at(20), 3000.0, power_w=291.0),
                         EnergyReading(gpus[("n01", 1)], at(20), 2000.0, power_w=180.0)])
    snapshot = collect(store.engine, now=at(30))
    gpu0, gpu1 = snapshot.nodes[0].gpus
    assert (gpu0.clock_mhz, gpu0.clock_known, gpu0.power_w) == (900, True, 291.0)
    assert [(i.id, i.sm_pct, i.sm_pct_planned) for i in gpu0.instances] == [(a, 50.0, 40.0)]
    assert gpu0.sm_pct_allocated == 50.0
    # Locked before its instance started: the node reset it when the GPU was left without jobs.
    assert (gpu1.clock_mhz, gpu1.clock_known, [i.sm_pct for i in gpu1.instances]) == (None, True, [30.0])
    text = render_text(snapshot)
    assert "clock     900 MHz  power   291 W  SM  50.0%" in text and "clock default MHz" in text
    assert f"#{b}" in text
    # Past the stale period the node's readings are unknown, not frozen at their last value.
    later = collect(store.engine, now=at(20 + READING_STALE_S + 1))
    gpu0 = later.nodes[0].gpus[0]
    assert (gpu0.power_w, gpu0.reading_at, gpu0.clock_known) == (None, None, False)
    assert "clock unknown MHz  power     - W" in render_text(later)
    assert json.loads(json.dumps(to_json(snapshot)))["nodes"][0]["gpus"][0]["reading_at"] == at(20).isoformat()


def test_slurm_overrides_node_state(store: Store) -> None:
    make_cluster(store)
    slurm = [SlurmNode("n02", "idle", ("DRAIN", "POWERED_DOWN"), "maintenance", 8, 0, (), ())]
    snapshot = collect(store.engine, now=at(0), slurm_nodes=slurm)
    assert (snapshot.nodes[1].state, snapshot.nodes[1].powered) == ("idle+drain+powered_down", False)
    assert (snapshot.nodes[0].state, snapshot.nodes[0].powered) == ("idle", True)
    assert snapshot.source == "database+slurm"


def test_bench_status_is_fast_enough_at_a_small_size() -> None:
    result = bench_status(gpus=64, gpus_per_node=8, requests=500)
    assert result["gpus"] == 64 and result["render_s"] < 1.0
