"""festinad's admin API against a fake Slurm: the consolidation plan, applied once and only once, and a model drained.

Two instances on two nodes; the plan evacuates one node onto the other; ``festina
consolidate`` prints it, ``--apply --plan-id`` carries it out (start on the target, cancel
the source), the same plan applied again, or a stale one, is refused with nothing done.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from festina_hpc.admin import client
from festina_hpc.admin.client import AdminApiError
from festina_hpc.cli.main import main
from festina_hpc.daemon.admin_api import add_admin_routes
from festina_hpc.daemon.festinad import Festinad
from festina_hpc.db.store import Store
from festina_hpc.policy.types import InstancePhase, StartInstance
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.server import running_app
from tests.daemon.test_festinad import FakeSlurm, Servers, _festinad, db  # noqa: F401  (db is a fixture)


async def _until(servers: Servers, condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await servers.pump()
        await asyncio.sleep(0.01)


async def _pumping(servers: Servers, coro: Any) -> Any:
    task = asyncio.ensure_future(coro)
    while not task.done():
        await servers.pump()
        await asyncio.sleep(0.01)
    return task.result()


def test_plan_apply_once_and_drain(store: ProfileStore, db: Store,  # noqa: F811
                                   capsys: pytest.CaptureFixture[str]) -> None:
    slurm = FakeSlurm(store)

    async def scenario() -> None:
        servers = Servers(store, slurm)
        festinad: Festinad = await _festinad(store, slurm, db)
        try:
            a = festinad.router.start(StartInstance("llama-3.1-8b", (0,), 50.0, 64, 0.3))
            b = festinad.router.start(StartInstance("mistral-7b", (2,), 50.0, 64, 0.3))
            await _until(servers, lambda: a.phase is InstancePhase.READY and b.phase is InstancePhase.READY)
            app = web.Application()
            add_admin_routes(app, festinad)
            async with running_app(app) as url:
                plan = await asyncio.to_thread(client.call, url, "GET", "/admin/consolidate")
                assert plan["plan_id"] and len(plan["migrations"]) == 1
                move = plan["migrations"][0]
                assert move["from_node"] != move["to_node"] and plan["nodes_freed"] == [move["from_node"]]
                assert plan["requeues"][0]["slurm_job_id"] == move["slurm_job_id"]
                assert plan["energy_saved_j"] > 0 and plan["horizon_s"] > 0
                code = await asyncio.to_thread(main, ["consolidate", "--dry-run", "--festinad-url", url])
                out = capsys.readouterr().out
                assert code == 0 and f"plan {plan['plan_id']}" in out and "nodes freed: " + move["from_node"] in out

                with pytest.raises(AdminApiError, match="is stale: the policy now proposes plan"):
                    await asyncio.to_thread(client.call, url, "POST", "/admin/consolidate", {"plan_id": "0" * 12})
                assert move["instance_id"] in festinad.view.live  # nothing done

                argv = ["consolidate", "--apply", "--plan-id", plan["plan_id"], "--festinad-url", url, "--json"]
                code = await _pumping(servers, asyncio.to_thread(main, argv))
                applied = json.loads(capsys.readouterr().out)
                assert code == 0 and applied["applied"] and applied["migrations_done"] == 1
                assert move["instance_id"] not in festinad.view.live
                assert move["slurm_job_id"] in slurm.cancelled
                nodes_used = {festinad.node_names[i.node] for i in festinad.view.live.values()}
                assert nodes_used == {move["to_node"]}

                code = await asyncio.to_thread(main, argv)
                err = capsys.readouterr().err
                assert code == 2 and f"plan {plan['plan_id']} was already applied at" in err
                assert len(err.strip().splitlines()) == 1
                reasons = [r.reason for r in db.decisions(since=db.decisions(since=_epoch())[0].decided_at)]
                assert any(f"admin apply, plan {plan['plan_id']}" in r for r in reasons)

                drained = await asyncio.to_thread(client.call, url, "POST", "/admin/drain-model",
                                                  {"model": "llama-3.1-8b"})
                assert drained["stopped"] and all(i.model != "llama-3.1-8b" for i in festinad.view.live.values())
                with pytest.raises(AdminApiError, match="plan_id = None must be"):
                    await asyncio.to_thread(client.call, url, "POST", "/admin/consolidate", {})
        finally:
            await festinad.close()
            await servers.stack.aclose()

    asyncio.run(scenario())


def _epoch() -> Any:
    from datetime import UTC, datetime

    return datetime(2000, 1, 1, tzinfo=UTC)
