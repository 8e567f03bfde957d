"""festina_hpc.node.metrics: the node's snapshot from its state, the metrics port, the AdminComment writer."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from festina_hpc.errors import ConfigError
from festina_hpc.node.config import node_config_from_mapping
from festina_hpc.node.metrics import CommentWriter, NodeMetrics, job_totals, start_node_outputs
from festina_hpc.node.state import GpuRecord, JobOnGpu, NodeState
from festina_hpc.slurm.errors import SlurmCommandError


def job(job_id: int, energy_j: float, sm_pct: float = 50.0, model: str | None = "llama-3.1-8b") -> JobOnGpu:
    return JobOnGpu(job_id=job_id, uid=0, user="root", sm_pct=sm_pct, started_at_s=0.0, start_counter_j=0.0,
                    model=model, energy_j=energy_j)


def state(*gpus: GpuRecord) -> NodeState:
    return NodeState({g.index: g for g in gpus})


class States:
    """Hands out the given states one per call, then the last one again."""

    def __init__(self, *states: NodeState):
        self.states = list(states)

    def __call__(self) -> NodeState:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def test_snapshot_power_from_counter_deltas_and_model_energy_that_only_grows() -> None:
    first = state(GpuRecord(0, (job(1, 100.0, 60), job(2, 50.0, 40, None)), counter_j=1000.0, read_at_s=10.0),
                  GpuRecord(1, (), counter_j=5.0, read_at_s=10.0))
    second = state(GpuRecord(0, (job(1, 400.0, 60), job(2, 250.0, 40, None)), counter_j=1500.0, read_at_s=12.0),
                   GpuRecord(1, (), counter_j=5.0, read_at_s=10.0))
    ended = state(GpuRecord(0, (), counter_j=1600.0, read_at_s=13.0), GpuRecord(1, (), counter_j=5.0, read_at_s=10.0))
    metrics = NodeMetrics("n1", States(first, second, ended))
    snap = metrics.snapshot()
    assert [(g.gpu_index, g.power_w, g.energy_j) for g in snap.gpus] == [(0, None, 1000.0), (1, None, 5.0)]
    snap = metrics.snapshot()
    assert [(g.gpu_index, g.power_w) for g in snap.gpus] == [(0, 250.0), (1, None)]  # 500 J over 2 s
    assert {m.model: (m.power_w, m.energy_j) for m in snap.models} == {"llama-3.1-8b": (150.0, 400.0),
                                                                        "unknown": (100.0, 250.0)}
    snap = metrics.snapshot()  # the jobs ended: their energy stays counted, their power is gone
    assert {m.model: (m.power_w, m.energy_j) for m in snap.models} == {"llama-3.1-8b": (0.0, 400.0),
                                                                        "unknown": (0.0, 250.0)}


def test_snapshot_shows_each_mps_jobs_share_and_the_one_wanted_instead() -> None:
    wants = JobOnGpu(job_id=1, uid=0, user="root", sm_pct=50.0, started_at_s=0.0, start_counter_j=0.0,
                     desired_sm_pct=30.0, uses_mps=True)
    keeps = JobOnGpu(job_id=2, uid=0, user="root", sm_pct=40.0, started_at_s=0.0, start_counter_j=0.0, uses_mps=True)
    whole = job(3, 0.0, 100)  # a whole GPU, not an MPS client: no share to show
    snap = NodeMetrics("n1", lambda: state(GpuRecord(0, (wants, keeps)), GpuRecord(1, (whole,)))).snapshot()
    assert [(f.gpu_index, f.job_id, f.sm_pct, f.wanted_sm_pct) for f in snap.shares] == [(0, 1, 50.0, 30.0),
                                                                                          (0, 2, 40.0, None)]


def test_job_totals_sum_a_job_over_its_gpus() -> None:
    s = state(GpuRecord(0, (job(7, 10.0), job(8, 1.0))), GpuRecord(1, (job(7, 5.0),)))
    assert [(t.job_id, t.energy_j) for t in job_totals(s)] == [(7, 15.0), (8, 1.0)]


@dataclass
class ScriptedSlurm:
    errors: dict[int, SlurmCommandError] = field(default_factory=dict)
    comments: list[tuple[int, str]] = field(default_factory=list)

    def set_admin_comment(self, job_id: int, text: str) -> None:
        if job_id in self.errors:
            raise self.errors[job_id]
        self.comments.append((job_id, text))


def test_comment_writer_writes_changes_only_and_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="festina_hpc.node.metrics")
    finished = SlurmCommandError(["scontrol"], "exit code 1", 1, "Job has already finished for job 2")
    down = SlurmCommandError(["scontrol"], "exit code 1", 1, "Unable to contact slurm controller")
    slurm = ScriptedSlurm({2: finished, 3: down})
    states = States(state(GpuRecord(0, (job(1, 7200.0), job(2, 1.0), job(3, 1.0)))),
                    state(GpuRecord(0, (job(1, 7200.0), job(3, 1.0)))),
                    state(GpuRecord(0, (job(1, 9000.4),))))
    writer = CommentWriter("n1", states, slurm, period_s=60)
    assert writer.write_once() == {1: "festina_energy_j=7200,festina_energy_kwh=0.002"}
    assert writer.write_once() == {}  # unchanged: not sent again
    assert writer.write_once() == {1: "festina_energy_j=9000,festina_energy_kwh=0.003"}
    assert [j for j, _ in slurm.comments] == [1, 1]
    assert "job 2: finished; Slurm keeps its last AdminComment" in caplog.text
    assert "job 3: AdminComment not written" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_port_serves_the_node_snapshot() -> None:
    s = state(GpuRecord(0, (job(1, 40.0, 100),), counter_j=123.0, read_at_s=1.0))
    port = _free_port()
    outputs = start_node_outputs("n1", lambda: s, metrics_port=port, metrics_addr="127.0.0.1", comment_period_s=0,
                                 client=None)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        outputs.stop()
    got = {(x.name, tuple(sorted(x.labels.items()))): x.value
           for f in text_string_to_metric_families(text) for x in f.samples}
    assert got[("festina_gpu_energy_joules_total", (("gpu", "0"), ("node", "n1")))] == 123.0
    assert got[("festina_model_energy_joules_total", (("model", "llama-3.1-8b"),))] == 40.0
    assert outputs.writer is None


def test_outputs_off_by_default() -> None:
    cfg = node_config_from_mapping({}, "t")
    assert (cfg.metrics_port, cfg.metrics_addr, cfg.admin_comment_period_s) == (0, "127.0.0.1", 30.0)


def test_live_share_change_is_off_by_default_and_a_boolean() -> None:
    assert node_config_from_mapping({}, "t").live_share_change is False
    assert node_config_from_mapping({"live_share_change": True}, "t").live_share_change is True


@pytest.mark.parametrize("raw, words", [
    ({"metrics_port": 70000}, "node.metrics_port = 70000 must be in 0..65535"),
    ({"metrics_port": "9400"}, "node.metrics_port must be int"),
    ({"live_share_change": "yes"}, "node.live_share_change must be bool, got 'yes'"),
    ({"metrics_port": True}, "node.metrics_port must be int, got True"),
    ({"admin_comment_period_s": -1}, "node.admin_comment_period_s must not be negative"),
])
def test_bad_output_settings_are_refused(raw: dict[str, object], words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        node_config_from_mapping(raw, "t")
