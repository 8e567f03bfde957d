"""Who may call festinad's /admin/*: an admin key where keys are required (none 401, a user key 403), the
loopback address or an admin key where they are not (403 for others unless ``admin_open``); the admin CLI
sends its key from the environment or a file and never prints it.

Served over real sockets (``running_app``); a request from another host is faked by an outer middleware
that gives the request that peer's address (``request.clone(remote=...)``), as a TCP peer sets it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from festina_hpc.cli.main import main
from festina_hpc.daemon.admin_api import add_admin_routes, is_loopback
from festina_hpc.daemon.auth import AuthConfig, Authenticator, MemoryKeys
from festina_hpc.daemon.festinad import Festinad, StoreRecorder
from festina_hpc.daemon.gateway import gateway_models
from festina_hpc.daemon.service import Periods, run_festinad
from festina_hpc.db.store import Store
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.server import api_errors, running_app
from tests.daemon.test_festinad import GPU, MODELS, FakeSlurm, Servers, _ask, _festinad, db  # noqa: F401
from tests.daemon.test_metrics import _free_port

ELSEWHERE = "10.0.0.5"  # a peer that is not this host


class FakeFestinad:
    """What the admin handlers read for ``drain-model`` with nothing running."""

    def __init__(self) -> None:
        self.view = SimpleNamespace(live={})
        self.stopped: list[Any] = []
        self.node_names = ["n1"]
        self.node_control = None  # /admin/node-control: 503, past the key check

    async def stop_instance(self, inst: Any, reason: str) -> None:
        self.stopped.append(inst)


def peer(remote: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def as_if_from(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        return await handler(request.clone(remote=remote))
    return as_if_from


def admin_app(auth: Authenticator | None, admin_open: bool = False, remote: str | None = None) -> web.Application:
    middlewares = [api_errors] + ([peer(remote)] if remote is not None else [])
    app = web.Application(middlewares=middlewares)  # as the gateway's app: api_errors outermost
    add_admin_routes(app, cast(Festinad, FakeFestinad()), auth, admin_open)
    return app


def keys_and_auth(require_keys: bool) -> tuple[Authenticator, str, str]:
    keys = MemoryKeys()
    user = keys.add("alice", "proj1")
    admin = keys.add("root", "ops", role="admin")
    return Authenticator(keys, AuthConfig(require_keys=require_keys)), user, admin


async def drain(url: str, token: str | None = None, method: str = "POST",
                path: str = "/admin/drain-model") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as session, \
            session.request(method, url + path, json={"model": "mistral-7b"}, headers=headers) as resp:
        return resp.status, await resp.json()


def error_shape(body: Any) -> bool:
    """The gateway's error JSON (OpenAI's): message, type, param, code."""
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                                                       "code"}


def test_keys_required_no_key_401_user_key_403_admin_key_200() -> None:
    auth, user, admin = keys_and_auth(require_keys=True)

    app = admin_app(auth)
    routes = [(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"]
    assert len(routes) == 4 and all(path.startswith("/admin/") for _, path in routes)

    async def scenario() -> None:
        async with running_app(app) as url:  # loopback: no pass without a key
            status, body = await drain(url)
            assert status == 401 and error_shape(body) and body["error"]["code"] == "invalid_api_key"
            status, body = await drain(url, user)
            assert status == 403 and error_shape(body) and body["error"]["code"] == "admin_key_required"
            assert "alice/proj1 is a user key" in body["error"]["message"]
            status, body = await drain(url, "fk_" + "x" * 43)
            assert status == 401
            assert await drain(url, admin) == (200, {"model": "mistral-7b", "stopped": []})
            for method, path in routes:  # every admin route, not just one
                assert (await drain(url, user, method, path))[0] == 403, path
                assert (await drain(url, None, method, path))[0] == 401, path
        async with running_app(admin_app(auth, admin_open=True)) as url:  # admin_open does not replace a key
            assert (await drain(url, user))[0] == 403

    asyncio.run(scenario())


@pytest.mark.parametrize("case, with_auth, remote, admin_open, token, status", [
    ("loopback, no key", True, None, False, None, 200),
    ("loopback, no authenticator", False, None, False, None, 200),
    ("another host, no key", True, ELSEWHERE, False, None, 403),
    ("another host, no authenticator", False, ELSEWHERE, False, None, 403),
    ("another host, user key", True, ELSEWHERE, False, "user", 403),
    ("another host, placeholder key", True, ELSEWHERE, False, "unused", 403),
    ("another host, bad festina key", True, ELSEWHERE, False, "fk_" + "x" * 43, 401),
    ("another host, admin key", True, ELSEWHERE, False, "admin", 200),
    ("another host, admin_open", True, ELSEWHERE, True, None, 200),
    ("IPv4-mapped loopback", True, "::ffff:127.0.0.1", False, None, 200),
])
def test_keys_off_loopback_only_unless_admin_open(case: str, with_auth: bool, remote: str | None, admin_open: bool,
                                                  token: str | None, status: int) -> None:
    auth, user, admin = keys_and_auth(require_keys=False)
    token = {"user": user, "admin": admin}.get(token or "", token)

    async def scenario() -> None:
        async with running_app(admin_app(auth if with_auth else None, admin_open, remote)) as url:
            got, body = await drain(url, token)
            assert got == status, (case, body)
            if got == 403:
                assert error_shape(body) and body["error"]["code"] == "admin_not_local"
                assert f"does not answer {ELSEWHERE}" in body["error"]["message"]
                assert "admin_open = true" in body["error"]["message"]

    asyncio.run(scenario())


@pytest.mark.parametrize("remote, local", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                           ("::ffff:127.0.0.1", True), (ELSEWHERE, False), ("::ffff:10.0.0.5", False),
                                           ("0.0.0.0", False), ("", False), (None, False), ("localhost", False)])
def test_is_loopback(remote: str | None, local: bool) -> None:
    assert is_loopback(remote) is local


def test_admin_cli_sends_its_key_and_never_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    auth, user, admin = keys_and_auth(require_keys=True)
    monkeypatch.delenv("FESTINA_API_KEY", raising=False)
    key_file = tmp_path / "admin.key"
    key_file.write_text(admin + "\n")
    key_file.chmod(0o600)

    async def scenario() -> None:
        async with running_app(admin_app(auth)) as url:
            async def festina(*argv: str) -> tuple[int, str, str]:
                code = await asyncio.to_thread(main, [*argv, "--festinad-url", url])
                out, err = capsys.readouterr()
                return code, out, err

            code, _, err = await festina("consolidate", "--dry-run")
            assert code == 2 and "needs an API key" in err and "$FESTINA_API_KEY" in err
            assert len(err.strip().splitlines()) == 1
            monkeypatch.setenv("FESTINA_API_KEY", user)
            code, out, err = await festina("nodes", "set-clock", "n1", "0", "1410")
            assert code == 2 and "needs an admin key" in err and user not in out + err
            # The key file wins over the environment: past the key check, the fake festinad has no node channel.
            code, out, err = await festina("nodes", "set-clock", "n1", "0", "1410", "--api-key-file", str(key_file))
            assert code == 2 and "has no channel to the nodes" in err, err
            assert admin not in out + err and user not in out + err
            monkeypatch.setenv("FESTINA_API_KEY", admin)
            code, out, err = await festina("nodes", "reset-clock", "n1", "0")
            assert code == 2 and "has no channel to the nodes" in err and admin not in out + err
            monkeypatch.setenv("FESTINA_API_KEY", user)
            key_file.chmod(0o644)
            code, out, err = await festina("nodes", "set-clock", "n1", "0", "1410", "--api-key-file", str(key_file))
            assert code == 2 and "may be read by group or others (mode 644): chmod 600 it" in err
            assert admin not in out + err

    asyncio.run(scenario())
    assert os.environ.get("FESTINA_API_KEY") == user


def test_running_festinad_with_keys_guards_admin_and_serves_users(store: ProfileStore, db: Store) -> None:  # noqa: F811
    """As ``festina daemon`` wires it (``run_festinad``): /admin/* takes an admin key only; /v1 a user key."""
    slurm = FakeSlurm(store)
    servers = Servers(store, slurm)
    auth, user, admin = keys_and_auth(require_keys=True)

    async def scenario() -> None:
        festinad = await _festinad(store, slurm, db)
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(run_festinad(
            festinad, StoreRecorder(db), gateway_models(store, GPU, MODELS), "127.0.0.1", _free_port(), stop,
            Periods(reconcile_s=60, scale_s=60, consolidate_s=60), on_ready=ready.set_result, auth=auth,
            admin_open=True))  # ignored while keys are required
        try:
            url = await asyncio.wait_for(asyncio.shield(ready), 20)
            assert (await drain(url))[0] == 401
            assert (await drain(url, user))[0] == 403
            assert await drain(url, admin) == (200, {"model": "mistral-7b", "stopped": []})
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {user}"}) as session:
                status, _ = await _ask(session, url, servers, model="llama-3.1-8b")
                assert status == 200  # the user key still serves completions
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await servers.stack.aclose()

    asyncio.run(scenario())
