"""End to end on a real local Slurm cluster: festinad starts, adopts, consolidates and survives a kill -9.

The issue's "Must show": requests for three models arrive at festinad; their
instances start from zero as Slurm serving jobs (``festina serve --engine
emulated``); a user's own serving job (the documented sbatch template) is
adopted; consolidation migrates it onto the node already serving (start on
the target, shift traffic, ``scancel`` the source), the emptied node idles
and Slurm's power saving suspends it (the power-state file says ``off``);
festinad is SIGKILLed with requests in flight and restarted: every request
got its answer or an error reply, and afterwards every festina job in Slurm
is an instance festinad holds (no orphan). A cluster of its own, whose every
node may power down, on free ports (``power_cluster`` in conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from festina_hpc.db.engine import make_engine
from festina_hpc.db.store import Store
from festina_hpc.devcluster import DevClusterConfig, free_ports
from festina_hpc.slurm.cli_backend import CliSlurmClient
from tests.daemon.live import ask, daemon_config, festina_jobs, festinad, power, user_job, wait_http

pytestmark = pytest.mark.slurm

MODELS = ("llama-3.1-8b", "mistral-7b", "llama-2-7b")
# A real cluster with power saving and periodic consolidation races on timing (a node resuming in
# 15-25 s, moves every 3 s): it passed 8 of 9 runs here, the miss most likely a node that never stayed
# empty long enough to be suspended within the wait. One rerun keeps CI honest without hiding a
# test that fails twice.
@pytest.mark.flaky(reruns=1)
def test_festinad_end_to_end(power_cluster: DevClusterConfig, tmp_path: Path) -> None:
    cfg = power_cluster
    slurm = CliSlurmClient(cfg.slurm_conf)
    port = free_ports(1, start=23000)
    user_port = free_ports(1, start=24000)
    db_path = tmp_path / "festina.db"
    config = daemon_config(tmp_path, port, free_ports(1, start=25000), models=",".join(MODELS),
                           reconcile_period_s=2.0, consolidate_period_s=3.0)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "festinad.log"

    # A user's own serving job from the documented template (docs/serving-jobs.md), on its own node.
    script = tmp_path / "user-serve.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=my-llama
#SBATCH --comment=festina:model=llama-3.1-8b,instance=user-1,port={user_port}
#SBATCH --gres=mps:50
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --nodelist=n4
#SBATCH --output={tmp_path}/user-%j.out
#SBATCH --requeue
exec {sys.executable} -m festina_hpc.cli.main serve --engine emulated --model llama-3.1-8b \\
    --gpu-type h100-sxm-80gb --host 0.0.0.0 --port {user_port} --sm-pct 50 --time-scale 0.5
""")
    env = {**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}
    subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, env=env, cwd=tmp_path)

    # A second user's small job on another node. Every node has two GPUs and the first requests
    # start at most one more instance beside them, so whichever node ends up the lighter, its
    # instances fit on the other's free GPU: consolidation always has a move to make.
    small_job = user_job(cfg, tmp_path, "user-2", "mistral-7b", "n1", 20)

    proc = festinad(config, cfg, log)
    try:
        asyncio.run(_first_run(url, slurm, small_job, cfg, log))
        # kill -9 mid-run with requests in flight: each gets an answer or an error, none hangs.
        outcomes = asyncio.run(_kill_mid_run(url, proc))
        assert all(kind in ("ok", "error") for kind, _ in outcomes)
        proc = festinad(config, cfg, log)
        asyncio.run(_after_restart(url, slurm, db_path))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for job in festina_jobs(slurm):
            slurm.cancel(job)
    print(log.read_text()[-3000:])


async def _first_run(url: str, slurm: CliSlurmClient, small_job: int, cfg: DevClusterConfig, log: Path) -> None:
    await wait_http(url, 30)
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Bad input gets a clear answer while the daemon serves.
        async with session.post(f"{url}/v1/completions", json={"model": "no-such-model", "prompt": "x"}) as resp:
            assert resp.status == 404
        async with session.post(f"{url}/v1/completions", data=b"{not json") as resp:
            assert resp.status == 400
        # Three models from zero: every request answered.
        asks = [ask(session, url, m, stream=i % 2 == 0) for i in range(2) for m in MODELS]
        results = await asyncio.gather(*asks)
        assert [kind for kind, _ in results] == ["ok"] * len(asks), \
            ([r for r in results if r[0] != "ok"],
             [(j.job_id, j.state, j.reason, j.gres, j.nodes) for j in slurm.list_jobs()])
        jobs = festina_jobs(slurm)
        # A cluster user who reads a festinad job's port from squeue gets nothing from it: no completion
        # without the instance's secret, and a /health that says nothing of its queue.
        own = [dict(f.split("=", 1) for f in j.comment.split(":", 1)[1].split(",")) for j in jobs.values()
               if j.state == "RUNNING" and "instance=" in j.comment
               and j.comment.split("instance=")[1].split(",")[0].isdigit()]
        assert own, jobs
        for fields in own:
            direct = f"http://127.0.0.1:{fields['port']}"
            async with session.post(f"{direct}/v1/completions",
                                    json={"model": fields["model"], "prompt": "x", "max_tokens": 1}) as resp:
                assert resp.status == 401, fields
            async with session.post(f"{direct}/admin/settings", json={"batch_cap": 1}) as resp:
                assert resp.status == 401, fields
            async with session.get(f"{direct}/health") as resp:
                assert set(await resp.json()) == {"status", "model"}, fields
        # Three models served, the user's job (adopted, even while its node resumes) perhaps serving llama.
        assert len(jobs) >= 3, jobs
        used_nodes = {n for j in jobs.values() for n in j.nodes}
        models_in_jobs = {j.comment.split("model=")[1].split(",")[0] for j in jobs.values()}
        assert set(MODELS) <= models_in_jobs
        db = Store(make_engine(f"sqlite:///{log.parent / 'festina.db'}"))
        # The second user's job is adopted once it runs (its node may first have to resume from
        # power saving: 15-25 s).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and small_job not in {
                i.slurm_job_id for i in db.load_live_state().instances}:
            await asyncio.sleep(1)
        assert small_job in {i.slurm_job_id for i in db.load_live_state().instances}, log.read_text()[-3000:]
        # Consolidation evacuates the least loaded node (start on the target, scancel the source) ...
        since = datetime.now(UTC) - timedelta(hours=1)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not db.decisions(since=since, kind="migration"):
            await asyncio.sleep(1)
        moves = db.decisions(since=since, kind="migration")
        assert moves, log.read_text()[-4000:]
        source_jobs = {i.slurm_job_id for i in db.load_live_state().instances}
        # ... and the node it emptied, now idle, is suspended by Slurm's power saving.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                power(cfg, n) == "off" and not any(n in j.nodes for j in festina_jobs(slurm).values())
                for n in cfg.node_names if n in used_nodes):
            await asyncio.sleep(1)
        assert any(power(cfg, n) == "off" for n in used_nodes), (used_nodes, source_jobs)
        # The model of the moved job is still served.
        kind, _ = await ask(session, url, "llama-3.1-8b")
        assert kind == "ok"


async def _kill_mid_run(url: str, proc: subprocess.Popen[bytes]) -> list[tuple[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        asks = [asyncio.ensure_future(ask(session, url, m, stream=True)) for m in MODELS for _ in range(3)]
        await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        return list(await asyncio.gather(*asks))


async def _after_restart(url: str, slurm: CliSlurmClient, db_path: Path) -> None:
    await wait_http(url, 30)
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(ask(session, url, m) for m in MODELS))
        assert [kind for kind, _ in results] == ["ok"] * len(MODELS), results
    await asyncio.sleep(3)  # one reconcile
    live = Store(make_engine(f"sqlite:///{db_path}")).load_live_state()
    held = {i.slurm_job_id for i in live.instances}
    running = set(festina_jobs(slurm))
    assert running <= held, f"orphaned jobs: {running - held}"
    assert len(live.instances) >= len(MODELS)
