"""The pyslurm backend and backend selection: against a stand-in module always, against real pyslurm only where
it imports (it needs Slurm 25.11 headers, so not on Debian's 22.05)."""

from __future__ import annotations

import importlib.util
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from festina_hpc.errors import ConfigError
from festina_hpc.slurm.cli_backend import CliSlurmClient
from festina_hpc.slurm.errors import SlurmCommandError, SlurmError
from festina_hpc.slurm.factory import make_slurm_client
from festina_hpc.slurm.pyslurm_backend import PyslurmSlurmClient
from festina_hpc.slurm.types import Gres, PowerState, ServingJobSpec


class RPCError(Exception):
    pass


@dataclass
class FakeJobRecord:
    id: int
    state: str = "RUNNING"
    name: str = "festina-m-i"
    state_reason: str = "None"
    allocated_nodes: str = "n[1-2]"
    required_nodes: str = ""
    excluded_nodes: str = ""
    comment: str = "festina:model=m,instance=i"
    user_name: str = "svc"
    account: str = "a"
    partition: str = "gpu"
    gres_per_node: dict[str, Any] = field(default_factory=lambda: {"mps": 25})
    requeue_count: int = 0


def fake_pyslurm(version: str = "25.11.2") -> tuple[types.SimpleNamespace, list[tuple[str, Any]]]:
    """A stand-in with pyslurm 25.x's names; records every call."""
    calls: list[tuple[str, Any]] = []
    jobs = {7: FakeJobRecord(7)}

    class Job:
        def __init__(self, job_id: int) -> None:
            self.job_id = job_id

        @staticmethod
        def load(job_id: int) -> FakeJobRecord:
            if job_id not in jobs:
                raise RPCError("Invalid job id specified")
            return jobs[job_id]

        def cancel(self) -> None:
            calls.append(("cancel", self.job_id))

        def hold(self) -> None:
            calls.append(("hold", self.job_id))

        def release(self) -> None:
            calls.append(("release", self.job_id))

        def requeue(self, hold: bool = False) -> None:
            calls.append(("requeue", (self.job_id, hold)))
            jobs[self.job_id].state = "PENDING"

        def modify(self, changes: Any) -> None:
            calls.append(("modify", (self.job_id, changes.kwargs)))

    class JobSubmitDescription:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def load_sbatch_options(self) -> None:
            calls.append(("load_sbatch_options", None))

        def submit(self) -> int:
            calls.append(("submit", self.kwargs["script"]))
            return 99

    class Node:
        def __init__(self, name: str | None = None, **changes: Any) -> None:
            self.name, self.changes = name, changes

        def modify(self, changes: Any) -> None:
            calls.append(("node.modify", (self.name, changes.changes)))

    node = types.SimpleNamespace(name="n4", state="IDLE+POWERED_DOWN", reason="", total_cpus=8, allocated_cpus=0,
                                 configured_gres={"gpu:h100": 2, "mps:h100": 200},
                                 allocated_gres={"gpu:h100": "1(IDX:0)"}, partitions=["gpu"], available_features=[])
    module = types.SimpleNamespace(
        __version__=version, Job=Job, JobSubmitDescription=JobSubmitDescription, Node=Node, RPCError=RPCError,
        Jobs=types.SimpleNamespace(load=lambda: dict(jobs)), Nodes=types.SimpleNamespace(load=lambda: {"n4": node}))
    return module, calls


def test_reads_map_onto_the_same_records() -> None:
    module, _ = fake_pyslurm()
    client = PyslurmSlurmClient(module)
    [job] = client.list_jobs()
    assert (job.job_id, job.nodes, job.gres, job.user) == (7, ("n1", "n2"), (Gres("mps", None, 25),), "svc")
    [node] = client.list_nodes()
    assert node.power_state is PowerState.OFF and (node.gpus_total, node.gpus_used, node.mps_total) == (2, 1, 200)
    assert client.get_job(8) is None and client.version() == (25, 11)
    assert set(client.get_jobs([7, 8])) == {7} and client.get_jobs([]) == {}


def test_submit_sends_the_cli_backends_script() -> None:
    module, calls = fake_pyslurm()
    spec = ServingJobSpec(model="m", instance_id="i", command=("sleep", "1"), output_path="/tmp/%j", gpus=1)
    assert PyslurmSlurmClient(module).submit(spec) == 99
    assert calls[0] == ("load_sbatch_options", None) and "#SBATCH --gres=gpu:1" in calls[1][1]


def test_requeue_holds_retargets_and_releases() -> None:
    module, calls = fake_pyslurm()
    PyslurmSlurmClient(module, sleep=lambda _s: None).requeue(7, ["n3"])
    assert calls == [("requeue", (7, True)), ("modify", (7, {"required_nodes": "n3", "begin_time": "now"})),
                     ("release", 7)]


def test_drain_resume_and_errors() -> None:
    module, calls = fake_pyslurm()
    client = PyslurmSlurmClient(module)
    client.drain("n4", "bad GPU")
    client.resume("n4")
    assert calls == [("node.modify", ("n4", {"state": "DRAIN", "reason": "bad GPU"})),
                     ("node.modify", ("n4", {"state": "RESUME"}))]
    module.Nodes.load = lambda: (_ for _ in ()).throw(RPCError("Unable to contact slurm controller"))
    with pytest.raises(SlurmCommandError, match=r"^pyslurm Nodes.load: RPCError: Unable to contact"):
        client.list_nodes()


def test_auto_takes_pyslurm_only_when_versions_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CliSlurmClient, "version", lambda self: (25, 11))
    module, _ = fake_pyslurm("25.11.2")
    assert isinstance(make_slurm_client("auto", load_pyslurm=lambda: module), PyslurmSlurmClient)
    old, _ = fake_pyslurm("24.5.0")
    assert isinstance(make_slurm_client("auto", load_pyslurm=lambda: old), CliSlurmClient)
    with pytest.raises(SlurmError, match=r"pyslurm is built for Slurm 24.05, the cluster runs 25.11"):
        make_slurm_client("pyslurm", load_pyslurm=lambda: old)


def test_auto_falls_back_when_pyslurm_is_missing() -> None:
    def missing() -> Any:
        raise SlurmError("pyslurm is not importable (No module named 'pyslurm')")

    assert isinstance(make_slurm_client("auto", load_pyslurm=missing), CliSlurmClient)
    assert isinstance(make_slurm_client("cli", load_pyslurm=missing), CliSlurmClient)
    with pytest.raises(SlurmError, match="pyslurm backend unusable: pyslurm is not importable"):
        make_slurm_client("pyslurm", load_pyslurm=missing)
    with pytest.raises(ConfigError, match="slurm backend = 'rest' is not one of auto, cli, pyslurm"):
        make_slurm_client("rest")


@pytest.mark.skipif(importlib.util.find_spec("pyslurm") is None,
                    reason="pyslurm is not installed: its wheels build only against Slurm 25.11 headers, "
                           "and this machine has Debian's Slurm 22.05 (pip install 'festina-hpc[slurm-pyslurm]')")
def test_real_pyslurm_has_the_api_the_backend_uses() -> None:
    import pyslurm  # type: ignore[import-not-found]

    for name in ("Job", "Jobs", "JobSubmitDescription", "Node", "Nodes"):
        assert hasattr(pyslurm, name), name
    for method in ("load", "cancel", "hold", "release", "requeue", "modify"):
        assert hasattr(pyslurm.Job, method), method


def test_set_admin_comment_modifies_the_job() -> None:
    module, calls = fake_pyslurm()
    PyslurmSlurmClient(module).set_admin_comment(7, "festina_energy_j=12")
    assert calls == [("modify", (7, {"admin_comment": "festina_energy_j=12"}))]
