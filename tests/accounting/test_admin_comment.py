"""festina_hpc.accounting.admin_comment: the text, the outcome for each case with a scripted client, and the
real local Slurm 22.05 cluster (accepts AdminComment while the job runs, refuses it once finished)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine

from festina_hpc.accounting.admin_comment import CommentOutcome, energy_comment, write_energy_comment
from festina_hpc.db import migrate
from festina_hpc.db.engine import make_engine
from festina_hpc.db.store import JobRecord, Store
from festina_hpc.devcluster import DevClusterConfig
from festina_hpc.slurm.cli_backend import CliSlurmClient
from festina_hpc.slurm.errors import SlurmCommandError
from festina_hpc.slurm.types import ServingJobSpec
from tests.db.accounting_fixture import T0, at
from tests.slurm.conftest import wait_for


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'f.db'}")
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def with_energy(engine: Engine, job_id: int, energy_j: float) -> None:
    store = Store(engine)
    store.upsert_jobs([JobRecord(job_id, "RUNNING", start_at=T0)])
    store.set_job_energy(job_id, energy_j, from_at=T0, to_at=at(60))


@dataclass
class RecordingClient:
    """Only the operation under test; answers with ``error`` when given."""

    error: SlurmCommandError | None = None
    comments: list[tuple[int, str]] = field(default_factory=list)

    def set_admin_comment(self, job_id: int, text: str) -> None:
        if self.error is not None:
            raise self.error
        self.comments.append((job_id, text))


@pytest.mark.parametrize(("energy_j", "text"), [
    (0.0, "festina_energy_j=0,festina_energy_kwh=0.000"),
    (9000.4, "festina_energy_j=9000,festina_energy_kwh=0.003"),
    (3_600_000.0 * 12.3456, "festina_energy_j=44444160,festina_energy_kwh=12.346"),
])
def test_energy_comment(energy_j: float, text: str) -> None:
    assert energy_comment(energy_j) == text


def test_written_refused_and_missing(engine: Engine) -> None:
    with_energy(engine, 42, 7_200_000.0)
    client = RecordingClient()
    assert write_energy_comment(client, engine, 42) == CommentOutcome(  # type: ignore[arg-type]
        42, "festina_energy_j=7200000,festina_energy_kwh=2.000", True)
    assert client.comments == [(42, "festina_energy_j=7200000,festina_energy_kwh=2.000")]
    assert write_energy_comment(client, engine, 43) == CommentOutcome(43, "", False,  # type: ignore[arg-type]
                                                                      "no energy recorded for job 43")
    finished = RecordingClient(SlurmCommandError(["scontrol"], "exit code 1", 1, "Job has already finished for job 42"))
    outcome = write_energy_comment(finished, engine, 42)  # type: ignore[arg-type]
    assert (outcome.written, outcome.reason) == (False, "Slurm refuses AdminComment updates of a finished job")
    down = RecordingClient(SlurmCommandError(["scontrol"], "exit code 1", 1, "Unable to contact slurm controller"))
    with pytest.raises(SlurmCommandError):
        write_energy_comment(down, engine, 42)  # type: ignore[arg-type]


@pytest.mark.slurm
def test_live_slurm_takes_the_comment_while_running_and_refuses_it_once_finished(
        slurm_cluster: DevClusterConfig, engine: Engine) -> None:
    client = CliSlurmClient(slurm_cluster.slurm_conf, timeout_s=20.0)
    on = [n for n in slurm_cluster.node_names if n not in slurm_cluster.power_save_node_names]
    spec = ServingJobSpec(model="llama-3.1-8b", instance_id="acct", command=("sleep", "300"),
                          output_path=str(slurm_cluster.base_dir / "out" / "%j.out"), mps_pct=10, nodelist=(on[0],))
    job_id = client.submit(spec)
    try:
        wait_for(lambda: (j := client.get_job(job_id)) is not None and j.state == "RUNNING", 20,
                 f"job {job_id} running")
        with_energy(engine, job_id, 123_456.7)
        assert write_energy_comment(client, engine, job_id).written
        shown = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                               env={"SLURM_CONF": str(slurm_cluster.slurm_conf), "PATH": "/usr/bin:/bin"}, check=True)
        assert "AdminComment=festina_energy_j=123457,festina_energy_kwh=0.034 " in shown.stdout
    finally:
        client.cancel(job_id)
    wait_for(lambda: (j := client.get_job(job_id)) is not None and j.state == "CANCELLED", 30,
             f"job {job_id} cancelled")
    outcome = write_energy_comment(client, engine, job_id)
    assert (outcome.written, outcome.reason) == (False, "Slurm refuses AdminComment updates of a finished job")
