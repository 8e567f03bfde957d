"""The NVML and MPS code paths: a fake pynvml, and a fake nvidia-cuda-mps-control on PATH."""

from __future__ import annotations

import io
import os
from pathlib import Path

from festina_hpc.gpu.mps import NvidiaMps
from festina_hpc.gpu.nvml import NvmlBackend
from festina_hpc.node.agent import NodeAgent
from festina_hpc.node.config import NodeConfig, NodePaths
from festina_hpc.node.main import Invocation, run_hook
from festina_hpc.node.state import StateFile
from tests.gpu.fake_pynvml import NVML_ERROR_NO_PERMISSION, FakeDevice, FakeNvml
from tests.node.conftest import FAKE_BIN, FakeSlurm, make_job

ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root", "SLURMD_NODENAME": "g1",
       "SLURM_JOB_GPUS": "0", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
       "SLURM_JOB_COMMENT": "festina:model=llama-3.1-8b,instance=3,clock_mhz=1410"}


def nvml_agent(tmp_path: Path, nvml: FakeNvml) -> tuple[NodeAgent, NodePaths]:
    paths = NodePaths.of(NodeConfig(state_dir=str(tmp_path)), "g1")
    mps = NvidiaMps(executable=str(FAKE_BIN / "nvidia-cuda-mps-control"),
                    base_env={"PATH": f"{FAKE_BIN}:/usr/bin:/bin"})
    agent = NodeAgent("g1", NvmlBackend(nvml), mps, StateFile(paths.state_file, paths.lock_file), paths,
                      slurm=FakeSlurm())
    return agent, paths


def commands(paths: NodePaths) -> list[str]:
    return (paths.mps_pipe_dir(0) / "commands.log").read_text().splitlines()


def test_prolog_and_epilog_on_nvml_drive_the_real_tool_protocol(tmp_path: Path) -> None:
    nvml = FakeNvml([FakeDevice(energy_step_mj=50_000)])
    agent, paths = nvml_agent(tmp_path, nvml)
    agent.prolog(make_job(7, mps_pct=50, clock_mhz=1410, node="g1"))
    assert nvml.devices[0].locked_mhz == (1410, 1410)
    agent.prolog(make_job(8, mps_pct=30, node="g1"))  # second client: the daemon is found, not started twice
    record = agent.epilog(make_job(7, mps_pct=50, node="g1"))
    assert record is not None and record.energy_j > 0
    assert nvml.devices[0].locked_mhz == (1410, 1410)
    agent.epilog(make_job(8, mps_pct=30, node="g1"))
    assert nvml.devices[0].locked_mhz is None  # idle: reset
    assert commands(paths) == ["get_server_list gpu=0", "-d gpu=0", "get_server_list gpu=0",
                               "get_server_list gpu=0", "quit gpu=0"]


def test_permission_denied_on_clocks_keeps_the_job_going(tmp_path: Path) -> None:
    nvml = FakeNvml()
    nvml.fail("nvmlDeviceSetGpuLockedClocks", NVML_ERROR_NO_PERMISSION)
    agent, paths = nvml_agent(tmp_path, nvml)
    agent.prolog(make_job(7, mps_pct=50, clock_mhz=1410, node="g1"))
    gpu = agent.status().gpu(0)
    assert gpu.clock_mhz is None and [j.job_id for j in gpu.jobs] == [7]
    assert nvml.devices[0].locked_mhz is None
    agent.epilog(make_job(7, mps_pct=50, node="g1"))
    assert "quit gpu=0" in commands(paths)


def test_a_crashed_real_daemon_is_found_restarted_and_its_jobs_requeued(tmp_path: Path) -> None:
    agent, paths = nvml_agent(tmp_path, FakeNvml())
    agent.prolog(make_job(9, mps_pct=50, node="g1"))
    pid = int((paths.mps_pipe_dir(0) / "fake-daemon.json").read_text().split(":")[1].strip(" }"))
    os.kill(pid, 9)
    report = agent.control_tick()
    assert report.mps_restarted == (0,) and report.requeued == (9,)
    assert commands(paths)[-2:] == ["quit gpu=0", "-d gpu=0"]
    agent.epilog(make_job(9, mps_pct=50, node="g1"))


def test_a_lost_gpu_drains_the_node_with_a_reason_and_the_hook_exits_0(tmp_path: Path) -> None:
    nvml = FakeNvml()
    agent, _ = nvml_agent(tmp_path, nvml)
    nvml.lost = True
    drained: list[str] = []
    inv = Invocation(NodeConfig(state_dir=str(tmp_path)), "g1", ENV, None)
    rc = run_hook(inv, "prolog", build=lambda _inv: agent, drain=lambda _inv, reason: drained.append(reason))
    assert rc == 0
    assert len(drained) == 1 and drained[0].startswith("festina: GPU 0:") and "GPU is lost" in drained[0]


def test_a_festina_failure_in_a_hook_fails_open_without_draining(tmp_path: Path) -> None:
    agent, paths = nvml_agent(tmp_path, FakeNvml())
    paths.node_dir.mkdir(parents=True, exist_ok=True)
    paths.state_file.write_text("not json")
    drained: list[str] = []
    inv = Invocation(NodeConfig(state_dir=str(tmp_path)), "g1", ENV, None)
    assert run_hook(inv, "prolog", build=lambda _inv: agent, drain=lambda _i, r: drained.append(r)) == 0
    assert run_hook(inv, "epilog", build=lambda _inv: agent, drain=lambda _i, r: drained.append(r)) == 0
    assert drained == []
    out = io.StringIO()
    assert run_hook(inv, "task-prolog", out=out) == 0
    assert f"CUDA_MPS_PIPE_DIRECTORY={paths.mps_pipe_dir(0)}" in out.getvalue()
