"""Helpers of the live festinad tests (test_e2e_slurm.py, test_admin_guide_walk.py): run festinad
against a dev cluster, ask it for completions, read Slurm and the power-state files, submit a user's
serving job from the documented sbatch template."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from festina_hpc.devcluster import DevClusterConfig, free_ports
from festina_hpc.slurm.cli_backend import CliSlurmClient
from festina_hpc.slurm.types import FINISHED_JOB_STATES

ROOT = Path(__file__).resolve().parents[2]


def daemon_config(tmp: Path, port: int, serve_port_base: int, db_url: str | None = None,
                  **daemon: float | str) -> Path:
    """``tmp``/festina.toml for a festinad under test: SQLite in ``tmp`` (or ``db_url``, e.g. the dev cluster's
    shared database), the emulated engine as Slurm jobs through the CLI backend, short timeouts and periods;
    ``daemon`` sets other [daemon] keys."""
    settings: dict[str, float | str] = {
        "host": "127.0.0.1", "port": port, "slurm_backend": "cli", "slurm_timeout_s": 20.0, "engine": "emulated",
        "serve_time_scale": 0.5, "job_output_dir": str(tmp), "serve_port_base": serve_port_base,
        "scale_timeout_s": 60.0, "start_timeout_s": 60.0, "drain_timeout_s": 5.0, "scale_period_s": 2.0,
        "keep_alive_s": 600.0,
        "metrics_listen": "",  # off: the default port would clash between festinads run side by side
        **daemon}
    db_url = db_url or f"sqlite:///{tmp / 'festina.db'}"
    lines = ["[db]", f"url = {json.dumps(db_url)}", "[daemon]",
             *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    path = tmp / "festina.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def festinad(config: Path, cfg: DevClusterConfig, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}
    # ``config`` names the database: CI's shell exports another cluster's FESTINA_DB_URL (`dev-cluster up`), which
    # would override it.
    for name in ("FESTINA_CONFIG", "FESTINA_DB_URL"):
        env.pop(name, None)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "festina_hpc.cli.main", "--config", str(config), "daemon",
                                 "-v"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


async def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


async def ask(session: aiohttp.ClientSession, url: str, model: str, stream: bool = False,
              key: str | None = None) -> tuple[str, Any]:
    """("ok", body) for a complete answer, ("error", status or exception) for an error reply; with ``key`` as
    the bearer token when given."""
    body = {"model": model, "prompt": "hello festina", "max_tokens": 6, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                return "error", resp.status
            if stream:
                return ("ok", data) if data.rstrip().endswith(b"data: [DONE]") else ("error", "cut stream")
            return "ok", json.loads(data)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return "error", type(exc).__name__


def power(cfg: DevClusterConfig, node: str) -> str:
    path = cfg.base_dir / "power" / node
    return path.read_text().strip() if path.exists() else "on"


def festina_jobs(slurm: CliSlurmClient) -> dict[int, Any]:
    return {j.job_id: j for j in slurm.list_jobs()
            if j.comment.startswith("festina:") and j.state not in FINISHED_JOB_STATES}


def user_job(cfg: DevClusterConfig, tmp: Path, name: str, model: str, node: str, mps: int) -> int:
    """A user's serving job from the documented sbatch template, tagged for festinad to adopt."""
    port = free_ports(1, start=24200 + 10 * mps)
    script = tmp / f"{name}.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --comment=festina:model={model},instance={name},port={port}
#SBATCH --gres=mps:{mps}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --nodelist={node}
#SBATCH --output={tmp}/{name}-%j.out
exec {sys.executable} -m festina_hpc.cli.main serve --engine emulated --model {model} \\
    --gpu-type h100-sxm-80gb --host 0.0.0.0 --port {port} --sm-pct {mps} --time-scale 0.5
""")
    out = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True,
                         cwd=tmp, env={**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}).stdout
    return int(out.strip().split(";")[0])
