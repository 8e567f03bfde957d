"""docs/admin-guide.md walked on a local Slurm cluster, each step's ``festina`` output checked.

Configure: ``festina db upgrade``, the guide's two ``festina models add`` lines, ``festina
models list``; festinad starts (a subprocess, as systemd would run it) and serves the
catalogue; requests name the catalogue names. Operate: ``festina status --json`` shows both
models' instances and their SLO attainment; ``festina consolidate --dry-run`` prints a plan
that frees a node, ``--apply --plan-id`` carries it out through festinad (the node ends with no
instance and no festina job) and the same plan applied again is refused with nothing done;
``festina decisions`` lists the adoptions and the admin's migration with its plan id, and
``festina status`` then shows the freed node powered off by Slurm's power saving.
The CLI runs in-process (``main(argv)``, what the console script calls) with the config and
``SLURM_CONF`` in the environment, as an admin's shell has them.

A consolidation move is made certain: two users' serving jobs from the documented sbatch
template, llama with ``--gres=mps:50`` on n1 and mistral with ``mps:20`` on n2, run before
festinad starts; festinad adopts them and the requests go to them, so festinad places nothing
of its own that could take the room. One fits beside the other on that node's MPS GPU (this
Slurm confines a node's MPS jobs to one GPU: a share festinad's view puts on a node's other,
empty GPU stays pending, so a layout where the only room is there would be a failed move, not
a test of the CLI). festinad's own consolidation period is an hour, so the CLI's ``--apply``
is what moves it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from festina_hpc.cli.main import main
from festina_hpc.devcluster import DevClusterConfig, free_ports
from festina_hpc.slurm.cli_backend import CliSlurmClient
from tests.daemon.live import ask, daemon_config, festina_jobs, festinad, user_job, wait_http

pytestmark = pytest.mark.slurm

# The guide's "Configure" lines, verbatim (festinad serves the profile; the dev cluster's serving jobs run the
# emulated engine of festinad's config, which ignores the vLLM --max-model-len; the account goes on the jobs).
ADD_LLAMA = ["models", "add", "llama8b", "--profile", "llama-3.1-8b", "--gpu-type", "h100", "--engine", "vllm",
             "--engine-args", "--max-model-len 8192", "--ttft-slo-s", "1.0", "--tbt-slo-s", "0.1",
             "--max-instances", "4", "--account", "llm"]
ADD_MISTRAL = ["models", "add", "mistral", "--profile", "mistral-7b", "--gpu-type", "h100", "--engine", "vllm",
               "--ttft-slo-s", "1.0", "--tbt-slo-s", "0.1"]
PROFILES = {"llama8b": "llama-3.1-8b", "mistral": "mistral-7b"}


class Cli:
    """``festina ARGS`` in-process: (exit status, stdout, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, (argv, out, err)
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--json"))


def _until(what: str, probe: Callable[[], Any], timeout_s: float, log: Path, every_s: float = 0.5) -> Any:
    """``probe()``'s first truthy answer within ``timeout_s`` (a loaded machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s\n{log.read_text()[-4000:]}")
        time.sleep(every_s)


def _instances(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every instance in ``festina status --json``, with its node's name."""
    return [{**inst, "node": node["name"]} for node in status["nodes"] for gpu in node["gpus"]
            for inst in gpu["instances"]]


def _slurm_state(cfg: DevClusterConfig) -> str:
    """Jobs (with why they pend) and each node's GRES use: what an assertion needs to say why a job did not run."""
    env = {**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %T %r %N %b %k"], capture_output=True, text=True, env=env)
    nodes = subprocess.run(["scontrol", "show", "node", "-d"], capture_output=True, text=True, env=env)
    return jobs.stdout + "".join(line + "\n" for line in nodes.stdout.splitlines()
                                 if "NodeName" in line or "Gres" in line or "State" in line)


async def _requests(url: str, per_model: int) -> list[tuple[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        asks = [ask(session, url, name, stream=i % 2 == 0) for i in range(per_model) for name in PROFILES]
        return list(await asyncio.gather(*asks))


def test_admin_guide_walk(power_cluster: DevClusterConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = power_cluster
    slurm = CliSlurmClient(cfg.slurm_conf)
    port = free_ports(1, start=23100)
    config = daemon_config(tmp_path, port, free_ports(1, start=25100), reconcile_period_s=1.0,
                           consolidate_period_s=3600.0)
    # The admin's shell: /etc/festina/festina.toml and Slurm's own config, here the test's.
    monkeypatch.setenv("FESTINA_CONFIG", str(config))
    monkeypatch.setenv("SLURM_CONF", str(cfg.slurm_conf))
    monkeypatch.delenv("FESTINA_URL", raising=False)
    monkeypatch.delenv("FESTINA_DB_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    festina = Cli(capsys)
    log = tmp_path / "festinad.log"
    url = f"http://127.0.0.1:{port}"

    # -- Configure ---------------------------------------------------------------------------------------------
    festina.ok("db", "upgrade")
    assert "added llama8b (llama-3.1-8b on h100-sxm-80gb, vllm, TTFT 1 s, TBT 0.1 s)" in festina.ok(*ADD_LLAMA)
    assert "added mistral (mistral-7b on h100-sxm-80gb, vllm" in festina.ok(*ADD_MISTRAL)
    listed = festina.ok("models", "list").splitlines()
    assert len(listed) == 3 and listed[1].split()[:4] == ["llama8b", "llama-3.1-8b", "h100-sxm-80gb", "vllm"]
    assert listed[2].split()[:2] == ["mistral", "mistral-7b"]
    assert "mistral-7b" in festina.ok("profiles", "list")

    # Two users' serving jobs (see the module docstring), allocated before festinad starts (their nodes may still be
    # resuming: festinad counts their shares before it places anything).
    first_user = user_job(cfg, tmp_path, "user-1", "llama-3.1-8b", "n1", 50)
    small_user = user_job(cfg, tmp_path, "user-2", "mistral-7b", "n2", 20)
    users = {first_user, small_user}
    _until("the users' jobs allocated", lambda: all(
        (job := slurm.get_job(j)) is not None and job.state in ("RUNNING", "CONFIGURING") for j in users), 30, log)
    proc = festinad(config, cfg, log)
    try:
        asyncio.run(wait_http(url, 60))
        _until("the users' jobs adopted and ready", lambda: users <= {
            i["slurm_job_id"] for i in _instances(festina.json("status")) if i["phase"] == "ready"}, 60, log)
        # -- Operate: requests under the catalogue names, then `festina status --json` --------------------------
        results = asyncio.run(_requests(url, 2))
        assert [kind for kind, _ in results] == ["ok"] * len(results), (results, log.read_text()[-3000:])
        results = asyncio.run(_requests(url, 2))  # warm instances: these are the ones within their SLOs
        assert [kind for kind, _ in results] == ["ok"] * len(results), results

        def served() -> dict[str, Any] | None:
            status = festina.json("status")
            models = {m["model"]: m for m in status["models"]}
            counted = all(models.get(p, {}).get("requests", 0) >= 4 for p in PROFILES.values())
            return status if counted else None  # the request records are flushed every second

        status = _until("status shows every request", served, 30, log)
        instances = _instances(status)
        assert {i["model"] for i in instances} >= set(PROFILES.values()), instances
        assert users <= {i["slurm_job_id"] for i in instances}, instances  # the users' jobs, adopted
        assert all(i["phase"] == "ready" and i["sm_pct"] > 0 for i in instances), instances
        for m in status["models"]:
            assert m["requests"] >= 4 and 0 <= m["slo_met"] <= m["requests"]
            assert m["attainment"] == pytest.approx(m["slo_met"] / m["requests"])
        text = festina.ok("status")
        assert "MODEL" in text and "ATTAINMENT" in text and "llama-3.1-8b" in text and "mistral-7b" in text

        # -- consolidate --dry-run, then --apply exactly that plan -------------------------------------------------
        plan = festina.json("consolidate", "--dry-run")
        assert plan["plan_id"] and plan["migrations"] and plan["nodes_freed"], plan
        dry = festina.ok("consolidate", "--dry-run")
        assert f"plan {plan['plan_id']} (" in dry and f"nodes freed: {', '.join(plan['nodes_freed'])}" in dry
        for move in plan["migrations"]:
            assert f"{move['from_node']} -> {move['to_node']}" in dry
        # --dry-run did nothing; a plan id that is not the plan now is refused, nothing done.
        on_source = {i["id"]: i["node"] for i in _instances(festina.json("status"))}
        assert all(on_source.get(m["instance_id"]) == m["from_node"] for m in plan["migrations"]), on_source
        code, out, err = festina("consolidate", "--apply", "--plan-id", "000000000000")
        assert code == 2 and "is stale: the policy now proposes plan " + plan["plan_id"] in err, (out, err)
        code, out, err = festina("consolidate", "--apply", "--plan-id", plan["plan_id"])
        assert code == 0, (out, err, log.read_text()[-4000:])
        assert f"plan {plan['plan_id']} (" in out and "applied" in out
        assert f"migrations done: {len(plan['migrations'])}, failed: 0" in out, (out, _slurm_state(cfg))
        # The same plan again: refused in one line, nothing done.
        code, out, err = festina("consolidate", "--apply", "--plan-id", plan["plan_id"])
        assert code == 2 and out == "", (out, err)
        assert f"plan {plan['plan_id']} was already applied at" in err and len(err.strip().splitlines()) == 1

        # The freed nodes: no instance in `festina status`, no festina job in Slurm (the sources were cancelled).
        freed = set(plan["nodes_freed"])

        def emptied() -> dict[str, Any] | None:
            status = festina.json("status")
            on_freed = [i for i in _instances(status) if i["node"] in freed]
            in_slurm = [j for j in festina_jobs(slurm).values() if freed & set(j.nodes)]
            return status if not on_freed and not in_slurm else None

        status = _until("the freed nodes empty", emptied, 30, log)
        moved = {m["model"] for m in plan["migrations"]}
        assert moved <= {i["model"] for i in _instances(status)}  # still served, elsewhere
        results = asyncio.run(_requests(url, 1))
        assert [kind for kind, _ in results] == ["ok"] * len(results), results

        # -- decisions: what happened, with the reasons ------------------------------------------------------------
        trail = festina.json("decisions", "--since", "1h")["decisions"]
        kinds = {d["kind"] for d in trail}
        assert {"scale", "migration"} <= kinds, kinds  # the adoptions (an instance more) and the move
        migrations = [d for d in trail if d["kind"] == "migration"]
        assert len(migrations) == len(plan["migrations"]), migrations  # once: the refused second apply did nothing
        assert all(f"admin apply, plan {plan['plan_id']}" in d["reason"] for d in migrations), migrations
        for job in users:
            assert any(f"adopt job {job} of " in d["reason"] for d in trail), trail
        listing = festina.ok("decisions", "--since", "1h")
        assert f"admin apply, plan {plan['plan_id']}" in listing and "migration" in listing
        assert len(listing.strip().splitlines()) == len(trail)

        # The emptied node is suspended by Slurm's power saving after SuspendTime ("Operate"): status shows it off.
        _until("a freed node powered off", lambda: any(
            not n["powered"] for n in festina.json("status")["nodes"] if n["name"] in freed), 60, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for job in festina_jobs(slurm):
            slurm.cancel(job)
