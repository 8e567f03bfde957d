"""Issue 21's end-to-end check: live energy accounting that adds up, on a whole dev cluster.

A dev cluster of its own (festina-node on every node, simulated GPUs, one shared database: SQLite, and
PostgreSQL in CI), festinad with keys for three accounts. alice (proj1) and bob (proj2) send requests to
two models for ``LOAD_S``; carol (proj3) has an energy quota of 1 J a day and sends one now and then,
until the gateway refuses her (429 with Retry-After). Then the serving jobs are cancelled and the
reports are read through the CLI: every account, model and user that sent or served requests has
energy, and the totals of ``--by account``, ``--by model`` and ``--by user`` plus the idle energy are
the nodes' counters (``--by node``) within 1%.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg import sql

from festina_hpc.devcluster import DevClusterConfig, free_ports
from tests.daemon.conftest import own_dev_cluster
from tests.daemon.live import ROOT, daemon_config, festinad, wait_http
from tests.db.conftest import _libpq, postgres_url  # noqa: F401  (the session's PostgreSQL fixture)

pytestmark = pytest.mark.slurm

MODELS = ("llama-3.1-8b", "mistral-7b")
SENDERS = (("alice", "proj1"), ("bob", "proj2"))
LOAD_S = float(os.environ.get("FESTINA_E2E_LOAD_S", "75"))  # of requests from both accounts
QUOTA_J = 1.0  # proj3's energy per day: past it after its first charged request
SETTLE_S = 60.0  # after the jobs are cancelled, for the epilogs and the last readings


@dataclass
class Run:
    cfg: DevClusterConfig
    db_url: str
    config: Path
    statuses: dict[str, list[int]]  # user -> HTTP statuses of its requests, in order
    refused: dict[str, Any]  # carol's first 429: its Retry-After and body


def festina(config: Path, *argv: str) -> str:
    env = {**os.environ}
    env.pop("FESTINA_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "festina_hpc.cli.main", "--config", str(config), *argv],
                          check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout


def report(run: Run, by: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(festina(run.config, "energy", "report", "--by", by, "--format", "json",
                                                    "--db-url", run.db_url))["rows"]
    return rows


def energy(rows: list[dict[str, Any]]) -> float:
    return sum(float(r["energy_j"] or 0.0) for r in rows)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """"" (the dev cluster's SQLite file) or a PostgreSQL database of the module's own."""
    if request.param == "sqlite":
        yield ""
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"e2e_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(base), autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


async def _load(url: str, keys: dict[str, str], statuses: dict[str, list[int]], refused: dict[str, Any]) -> None:
    deadline = time.monotonic() + LOAD_S
    timeout = aiohttp.ClientTimeout(total=90)

    async def send(session: aiohttp.ClientSession, user: str, model: str) -> tuple[int, Any]:
        body = {"model": model, "prompt": f"hello from {user}", "max_tokens": 24}
        async with session.post(f"{url}/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {keys[user]}"}) as resp:
            answer = await resp.json()
            statuses[user].append(resp.status)
            if resp.status == 429 and not refused:
                refused.update(retry_after=resp.headers.get("Retry-After"), body=answer)
            return resp.status, answer

    async def sender(session: aiohttp.ClientSession, user: str, model: str) -> None:
        while time.monotonic() < deadline:
            await send(session, user, model)
            await asyncio.sleep(0.2)

    async def carol(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline and not refused:
            await send(session, "carol", MODELS[0])
            await asyncio.sleep(1.0)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(carol(session), *(sender(session, user, model)
                                               for user, _ in SENDERS for model in MODELS))


@pytest.fixture(scope="module")
def run(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("accounting")
    with contextlib.contextmanager(own_dev_cluster)("festina-acct", 22500, power_save_nodes=0,
                                                    db_url=database) as cfg:
        port = free_ports(1, start=23700)
        config = daemon_config(tmp, port, free_ports(1, start=25700), db_url=cfg.database_url,
                               models=",".join(MODELS), reconcile_period_s=2.0)
        with config.open("a") as out:
            out.write(f"[gateway]\nrequire_keys = true\nquota_refresh_s = 1.0\n"
                      f"[gateway.account_energy_quota_j_per_day]\nproj3 = {QUOTA_J}\n")
        festina(config, "db", "upgrade")
        keys = {user: json.loads(festina(config, "keys", "create", "--user", user, "--account", account,
                                         "--json"))["token"]
                for user, account in (*SENDERS, ("carol", "proj3"))}
        log = tmp / "festinad.log"
        proc = festinad(config, cfg, log)
        statuses: dict[str, list[int]] = {user: [] for user in keys}
        refused: dict[str, Any] = {}
        env = {**os.environ, "SLURM_CONF": str(cfg.slurm_conf)}
        try:
            asyncio.run(wait_http(f"http://127.0.0.1:{port}", 30))
            asyncio.run(_load(f"http://127.0.0.1:{port}", keys, statuses, refused))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            subprocess.run(["scancel", "--user", "root"], env=env, check=False, capture_output=True)
            print(log.read_text()[-3000:])
        r = Run(cfg, cfg.database_url, config, statuses, refused)
        # The epilogs record the jobs' last intervals and the GPUs go idle: the instances' energy stops growing.
        deadline, last = time.monotonic() + SETTLE_S, -1.0
        while time.monotonic() < deadline:
            now = energy(report(r, "model"))
            if now == last and not subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                  text=True).stdout.strip():
                break
            last = now
            time.sleep(3)
        yield r


def test_both_accounts_were_served_and_the_one_over_quota_refused(run: Run) -> None:
    for user, _ in SENDERS:
        assert run.statuses[user] and set(run.statuses[user]) == {200}, (user, sorted(set(run.statuses[user])))
    assert run.refused, f"carol (proj3, quota {QUOTA_J} J/day) was never refused: {run.statuses['carol']}"
    assert run.statuses["carol"][0] == 200 and run.statuses["carol"][-1] == 429
    assert int(run.refused["retry_after"]) > 0  # until the next UTC day
    assert "'proj3'" in run.refused["body"]["error"]["message"]


def test_reports_by_account_model_and_user_have_energy_and_add_up_to_the_nodes(run: Run) -> None:
    nodes = report(run, "node")
    node_j, idle_j = energy(nodes), sum(float(r["idle_energy_j"]) for r in nodes)
    assert node_j > 0 and 0 <= idle_j < node_j
    accounts = {r["account"]: float(r["energy_j"]) for r in report(run, "account")}
    models = {r["model"]: float(r["energy_j"]) for r in report(run, "model")}
    users = {r["user_name"]: float(r["energy_j"]) for r in report(run, "user")}
    for account in ("proj1", "proj2", "proj3"):
        assert accounts.get(account, 0.0) > 0, accounts
    for model in MODELS:
        assert models.get(model, 0.0) > 0, models
    for user in ("alice", "bob"):
        assert users.get(user, 0.0) > 0, users
    for by, charged in (("account", accounts), ("model", models), ("user", users)):
        assert sum(charged.values()) + idle_j == pytest.approx(node_j, rel=0.01), (by, charged, idle_j, node_j)
    days = report(run, "day")
    assert sum(float(d["attributed_energy_j"]) for d in days) == pytest.approx(node_j - idle_j, rel=0.01)
