"""festinad stopped (SIGTERM, ``systemctl restart``) with a stream in flight: the request is in the database.

Goes through ``run_festinad`` itself (fake Slurm, emulated servers), so the gateway's cut, the runner's
cleanup and the recorder's last flush are checked in the order the daemon runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp
from sqlalchemy import select

from festina_hpc.daemon.festinad import StoreRecorder
from festina_hpc.daemon.gateway import gateway_models
from festina_hpc.daemon.service import Periods, run_festinad
from festina_hpc.db.models import RequestRecord
from festina_hpc.db.store import Store
from festina_hpc.profiles.store import ProfileStore
from tests.daemon.test_festinad import GPU, MODELS, FakeSlurm, Servers, _ask, _festinad, db  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_stream_cut_by_festinad_stopping_is_in_the_requests_table(store: ProfileStore,
                                                                    db: Store) -> None:  # noqa: F811
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)

    async def scenario() -> list[bytes]:
        festinad = await _festinad(store, slurm, db)
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(run_festinad(
            festinad, StoreRecorder(db), gateway_models(store, GPU, MODELS), "127.0.0.1", _free_port(), stop,
            Periods(reconcile_s=60, scale_s=60, consolidate_s=60, flush_s=60), on_ready=ready.set_result,
            shutdown_s=0.2))  # flush_s: only the flush on the way out can write the row
        lines: list[bytes] = []
        try:
            url = await asyncio.wait_for(asyncio.shield(ready), 20)
            async with aiohttp.ClientSession() as session:
                status, _ = await _ask(session, url, servers, model="llama-3.1-8b")  # an instance up
                assert status == 200
                body = {"model": "llama-3.1-8b", "prompt": "hi", "max_tokens": 8000, "stream": True}
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        async for line in resp.content:
                            if line.strip():
                                lines.append(line.strip())
                            if len(lines) == 3:
                                stop.set()  # SIGTERM: run_festinad's signal handler sets it
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await servers.stack.aclose()
        return lines

    lines = asyncio.run(scenario())
    assert b"[DONE]" not in b"".join(lines)
    assert json.loads(lines[-1].removeprefix(b"data: "))["error"]["type"] == "service_unavailable"
    with db.engine.connect() as conn:
        rows = conn.execute(select(RequestRecord.outcome, RequestRecord.output_tokens)
                            .order_by(RequestRecord.id)).all()
    assert [row.outcome for row in rows] == ["ok", "gateway_stopped"]  # the first request and the cut one
    assert rows[1].output_tokens >= len(lines) - 1 >= 3  # the tokens it served, charged
