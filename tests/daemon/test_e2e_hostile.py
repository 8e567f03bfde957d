"""Issue 20's hostile user on the dev cluster: each way past festinad's keys that the issue found, tried again.

One festinad with ``[gateway] require_keys = true`` (keys made with ``festina keys create``, one of them
``--role admin``) serves one model as emulated Slurm serving jobs on a dev cluster of its own; every test
below is one thing a cluster user tried: the admin API without an admin key, an instance's port read from
``squeue`` and called directly, ``/metrics`` on the gateway, a huge ``max_tokens``, a deeply nested or a
2 MiB body, a client that hangs up (the instance must stop generating), an instance ``scancel``-ed
mid-stream (the client must see an error), a festinad restarted mid-stream (the request still charged),
a newline in the hooks' environment (no forged log line). The module shares the cluster and the
festinad; the tests run in file order, the destructive ones last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from festina_hpc.devcluster import DevClusterConfig, free_ports
from tests.daemon.conftest import own_dev_cluster
from tests.daemon.live import daemon_config, festinad, wait_http

pytestmark = pytest.mark.slurm

MODEL = "llama-3.1-8b"
ROOT = Path(__file__).resolve().parents[2]
# Long enough that an instance still generating it after a hang-up is plainly seen (about 10 s at
# serve_time_scale 0.5), short of the model's output limit.
LONG_MAX_TOKENS = 2000
SHORT_MAX_TOKENS = 4  # of every other completion here; a row with more tokens is a long request's
CHECKPOINTED_AFTER_S = 2.5  # festinad checkpoints requests in flight every flush (1 s)
HANG_UP_GRACE_S = 5.0  # "within one step" of the engine, plus festinad's and the poll's latency


@dataclass(frozen=True)
class Hostile:
    """The running festinad under attack and what a cluster user (or its admin) holds."""

    cfg: DevClusterConfig
    tmp: Path
    url: str  # the gateway
    metrics_url: str  # festinad's own metrics listener (loopback)
    user_key: str
    admin_key: str
    config: Path
    log: Path
    procs: list[subprocess.Popen[bytes]]  # festinad's processes, the running one last (a test restarts it)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.cfg.slurm_conf)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevClusterConfig]:
    """Four nodes, none powered down (no resume waits: these tests are about keys, not power)."""
    yield from own_dev_cluster("festina-hostile", 21500, power_save_nodes=0)


def festina_cli(config: Path, *argv: str) -> str:
    env = {**os.environ}
    env.pop("FESTINA_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "festina_hpc.cli.main", "--config", str(config), *argv], check=True,
                          capture_output=True, text=True, env=env, cwd=ROOT).stdout


@pytest.fixture(scope="module")
def hostile(cluster: DevClusterConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_ports(2, start=23500)
    metrics_port = port + 1
    config = daemon_config(tmp, port, free_ports(1, start=25500), models=MODEL, reconcile_period_s=2.0,
                           metrics_listen=f"127.0.0.1:{metrics_port}")
    with config.open("a") as out:
        out.write("[gateway]\nrequire_keys = true\n")
    festina_cli(config, "db", "upgrade")
    user_key = json.loads(festina_cli(config, "keys", "create", "--user", "alice", "--account", "proj1",
                                      "--json"))["token"]
    admin_key = json.loads(festina_cli(config, "keys", "create", "--user", "root", "--account", "ops",
                                       "--role", "admin", "--json"))["token"]
    log = tmp / "festinad.log"
    h = Hostile(cluster, tmp, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", user_key, admin_key,
                config, log, [festinad(config, cluster, log)])
    try:
        asyncio.run(wait_http(h.url, 30))
        # One instance up (from zero: a Slurm job), so that there is a port to find in squeue.
        status, body = asyncio.run(complete(h, {"max_tokens": SHORT_MAX_TOKENS}, timeout_s=90))
        assert status == 200, (status, body, log.read_text()[-3000:])
        yield h
    finally:
        stop(h.procs[-1])
        subprocess.run(["scancel", "--user", "root"], env=h.env(), check=False, capture_output=True)
        print(log.read_text()[-3000:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def complete(h: Hostile, fields: dict[str, Any], key: str | None = "user", timeout_s: float = 30,
                   data: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body or text) of a POST /v1/completions through the gateway with ``key``'s token."""
    token = {"user": h.user_key, "admin": h.admin_key}.get(key or "")
    body = {"model": MODEL, "prompt": "hello festina", **fields}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.post(f"{h.url}/v1/completions", headers=bearer(token),
                                **({"data": data} if data is not None else {"json": body})) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


def error_shape(body: Any) -> bool:
    """OpenAI's error JSON, which every 4xx/5xx of the gateway must be."""
    return (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and {"message", "type", "param", "code"} <= set(body["error"]))


def instances(h: Hostile) -> list[dict[str, str]]:
    """What any cluster user reads from squeue: each running festina job's comment fields (port among them)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], env=h.env(), check=True,
                         capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        job, _, comment = line.partition("|")
        if comment.startswith("festina:"):
            fields = comment[len("festina:"):].split(",")
            found.append({"job": job, **dict(f.split("=", 1) for f in fields if "=" in f)})
    return found


async def in_flight(h: Hostile) -> int:
    """Requests the model's instances are generating, from their /health with their secret (festinad's file)."""
    total = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for inst in instances(h):
            secret = h.tmp / "secrets" / f"instance-{inst['instance']}.secret"
            headers = bearer(secret.read_text().splitlines()[0]) if secret.exists() else {}
            async with session.get(f"http://127.0.0.1:{inst['port']}/health", headers=headers) as resp:
                total += int((await resp.json()).get("in_flight", 0))
    return total


async def wait_in_flight(h: Hostile, check: Any, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = await in_flight(h)
        if check(n) or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.2)


# --- The admin API ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/admin/drain-model", {"model": MODEL}),
    ("/admin/node-control", {"node": "n1", "op": "lock_clocks", "args": {"gpu": 0, "clock_mhz": 345}}),
])
def test_admin_api_is_401_without_a_key_and_403_with_a_user_key(hostile: Hostile, path: str,
                                                                 body: dict[str, Any]) -> None:
    async def scenario() -> list[tuple[int, bool]]:
        statuses = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for token in (None, hostile.user_key):
                async with session.post(f"{hostile.url}{path}", json=body, headers=bearer(token)) as resp:
                    statuses.append((resp.status, error_shape(await resp.json())))
        return statuses

    assert asyncio.run(scenario()) == [(401, True), (403, True)]
    # The model was not drained: it still serves.
    assert asyncio.run(complete(hostile, {"max_tokens": SHORT_MAX_TOKENS}))[0] == 200


def test_admin_api_answers_an_admin_key(hostile: Hostile) -> None:
    async def scenario() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async with session.get(f"{hostile.url}/admin/consolidate", headers=bearer(hostile.admin_key)) as resp:
                return resp.status

    assert asyncio.run(scenario()) == 200


def test_metrics_are_not_on_the_gateway_but_on_the_loopback_listener(hostile: Hostile) -> None:
    async def scenario() -> tuple[int, int, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{hostile.url}/metrics", headers=bearer(hostile.user_key)) as resp:
                gateway = resp.status
            async with session.get(f"{hostile.metrics_url}/metrics") as resp:
                return gateway, resp.status, await resp.text()

    gateway, listener, text = asyncio.run(scenario())
    assert gateway == 404
    assert listener == 200 and "festina" in text


# --- Serving jobs ------------------------------------------------------------------------------------------

def test_an_instance_port_read_from_squeue_gives_nothing_without_its_secret(hostile: Hostile) -> None:
    found = instances(hostile)
    assert found and all("port" in i for i in found), found

    async def scenario() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for inst in found:
                direct = f"http://127.0.0.1:{inst['port']}"
                async with session.post(f"{direct}/v1/completions",
                                        json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as resp:
                    assert resp.status == 401, inst
                async with session.post(f"{direct}/admin/settings",
                                        json={"sm_pct": 10, "clock_mhz": 345, "batch_cap": 1}) as resp:
                    assert resp.status == 401, inst
                async with session.get(f"{direct}/health") as resp:
                    assert set(await resp.json()) == {"status", "model"}, inst

    asyncio.run(scenario())
    # The secrets exist, and none is in what squeue shows of the jobs (comment, command line).
    shown = subprocess.run(["squeue", "-h", "-o", "%k %o"], env=hostile.env(), check=True, capture_output=True,
                           text=True).stdout
    secrets = [p.read_text().strip() for p in (hostile.tmp / "secrets").glob("*.secret")]
    assert secrets and not any(s in shown for s in secrets)


# --- Limits and bad input ----------------------------------------------------------------------------------

def test_a_huge_max_tokens_is_400_naming_the_field(hostile: Hostile) -> None:
    status, body = asyncio.run(complete(hostile, {"max_tokens": 100_000_000}))
    assert status == 400 and error_shape(body), body
    assert "max_tokens" in body["error"]["message"] or body["error"]["param"] == "max_tokens", body


def test_a_deeply_nested_body_is_400_in_the_error_shape(hostile: Hostile) -> None:
    deep = b'{"model": "' + MODEL.encode() + b'", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = asyncio.run(complete(hostile, {}, data=deep))
    assert status == 400 and error_shape(body), (status, str(body)[:300])


def test_a_2_mib_body_is_413_in_the_error_shape(hostile: Hostile) -> None:
    big = json.dumps({"model": MODEL, "prompt": "x" * (2 << 20), "max_tokens": 1}).encode()
    status, body = asyncio.run(complete(hostile, {}, data=big))
    assert status == 413 and error_shape(body), (status, str(body)[:300])


# --- A request ends with its client ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_client_that_hangs_up_stops_the_generation(hostile: Hostile, stream: bool) -> None:
    async def scenario() -> tuple[int, int]:
        assert await wait_in_flight(hostile, lambda n: n == 0, 20) == 0
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        body = {"model": MODEL, "prompt": "hello festina", "max_tokens": LONG_MAX_TOKENS, "stream": stream}

        async def ask() -> None:
            async with session.post(f"{hostile.url}/v1/completions", json=body,
                                    headers=bearer(hostile.user_key)) as resp:
                assert resp.status == 200
                if stream:
                    await resp.content.readline()  # the first chunk: generating
                    await asyncio.sleep(3600)  # then hold the connection until hung up
                await resp.read()

        task = asyncio.ensure_future(ask())
        busy = await wait_in_flight(hostile, lambda n: n >= 1, 20)
        await asyncio.sleep(0.5)
        task.cancel()
        await session.close()  # the hang-up: the client's socket closes
        with pytest.raises(asyncio.CancelledError):
            await task
        return busy, await wait_in_flight(hostile, lambda n: n == 0, HANG_UP_GRACE_S)

    last_id = last_request(hostile)[0]
    busy, after = asyncio.run(scenario())
    assert busy >= 1
    assert after == 0, f"the instance still generates {after} request(s) {HANG_UP_GRACE_S} s after the hang-up"
    # Recorded (festinad flushes every second), with the tokens served before the hang-up to charge (more
    # than the short requests' before, whose rows may be flushed late).
    deadline = time.monotonic() + 5
    while not (cut := [r for r in requests_since(hostile, last_id) if r[1] == "alice" and SHORT_MAX_TOKENS < r[2]]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(cut) == 1 and cut[0][2] < LONG_MAX_TOKENS, (cut, requests_since(hostile, last_id))


def last_request(h: Hostile) -> tuple[int, str, int]:
    """(id, user, output tokens) of the requests table's newest row; id 0 when it has none."""
    return ([(0, "", 0)] + requests_since(h, 0))[-1]


def requests_since(h: Hostile, after_id: int) -> list[tuple[int, str, int]]:
    """(id, user, output tokens) of the requests table's rows after ``after_id``, oldest first."""
    with closing(sqlite3.connect(h.tmp / "festina.db")) as db:
        return db.execute("SELECT id, user_name, output_tokens FROM requests WHERE id > ? ORDER BY id",
                          (after_id,)).fetchall()


# --- Hooks ---------------------------------------------------------------------------------------------------

FORGED = "2026-12-07 10:00:00,000 festina-node[1] INFO prolog job=9 node=n1 gpus=0 mps=25"


@pytest.mark.parametrize(("job_id", "shown"), [
    (f"8\n{FORGED}", "SLURM_JOB_ID '8\\n2026-12-07"),  # a newline then a whole forged record
    ("1" * 100_000, "(100000 chars)"),  # was a traceback
], ids=["newline", "100000-digits"])
def test_a_hostile_job_id_is_one_escaped_line_in_the_dev_clusters_hook_log(hostile: Hostile, job_id: str,
                                                                            shown: str) -> None:
    """The dev cluster's own prolog (slurm_plugins/prolog, its festina-node and hook log) given a job id
    that carries a newline and a forged record, or 100,000 digits: one escaped line, no traceback, exit 0."""
    hook_log = hostile.cfg.slurm_conf.parent / "festina-hooks.log"
    before = hook_log.read_text() if hook_log.exists() else ""
    env = {**hostile.env(), "SLURM_JOB_ID": job_id, "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root",
           "SLURMD_NODENAME": "n2", "SLURM_JOB_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0",
           "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
           "SLURM_JOB_COMMENT": f"festina:model={MODEL},instance=12"}
    done = subprocess.run([str(ROOT / "slurm_plugins" / "prolog")], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    new = hook_log.read_text()[len(before):].splitlines()
    assert len(new) == 1 and len(new[0]) < 300 and "Traceback" not in new[0], [line[:300] for line in new]
    assert shown in new[0], new[0]
    assert not any(line.startswith(FORGED) for line in hook_log.read_text().splitlines())


# --- Failures are visible (last: it kills the instance) -----------------------------------------------------

def test_an_instance_cancelled_mid_stream_ends_the_stream_with_an_error_event(hostile: Hostile) -> None:
    async def scenario() -> bytes:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            body = {"model": MODEL, "prompt": "hello festina", "max_tokens": LONG_MAX_TOKENS, "stream": True}
            async with session.post(f"{hostile.url}/v1/completions", json=body,
                                    headers=bearer(hostile.user_key)) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                for inst in instances(hostile):
                    subprocess.run(["scancel", inst["job"]], env=hostile.env(), check=True)
                try:
                    return first + await resp.read()
                except aiohttp.ClientPayloadError:
                    return first  # a cut with no event at all: no error the client can read

    data = asyncio.run(scenario())
    events = [line[len(b"data: "):] for line in data.splitlines() if line.startswith(b"data: ")]
    assert events and events[-1] != b"[DONE]", data[-300:]
    assert "error" in json.loads(events[-1]), data[-300:]


def test_a_request_after_an_instance_died_waits_for_its_replacement(hostile: Hostile) -> None:
    status, body = asyncio.run(complete(hostile, {"max_tokens": SHORT_MAX_TOKENS}, timeout_s=90))
    assert status == 200, (status, body)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stream_cut_by_a_festinad_restart_is_recorded(hostile: Hostile, sig: signal.Signals) -> None:
    """festinad stops mid-stream (SIGTERM: the stream is cut after its shutdown grace; SIGKILL: at once): the
    tokens it served are in the requests table to charge once festinad runs again (after a SIGKILL, those of
    the request's last checkpoint, taken every flush)."""
    deadline = time.monotonic() + 60
    while asyncio.run(complete(hostile, {"max_tokens": SHORT_MAX_TOKENS}, timeout_s=60))[0] != 200:
        assert time.monotonic() < deadline, "the model is not served again after its instance was cancelled"
        time.sleep(1)
    last_id = last_request(hostile)[0]

    async def scenario() -> bytes:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            # Longer than festinad's 10 s shutdown grace, so the restart cuts it.
            body = {"model": MODEL, "prompt": "hello festina", "max_tokens": 4 * LONG_MAX_TOKENS, "stream": True}
            async with session.post(f"{hostile.url}/v1/completions", json=body,
                                    headers=bearer(hostile.user_key)) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                # Past a few flushes (1 s each), so the request has been checkpointed in flight.
                read_until_s = time.monotonic() + CHECKPOINTED_AFTER_S
                while time.monotonic() < read_until_s:
                    first += await resp.content.readline()
                hostile.procs[-1].send_signal(sig)
                try:
                    return first + await resp.read()
                except aiohttp.ClientPayloadError:
                    return first

    data = asyncio.run(scenario())
    assert not data.rstrip().endswith(b"data: [DONE]"), "the stream was not cut: it outlasted no restart"
    stop(hostile.procs[-1])
    hostile.procs.append(festinad(hostile.config, hostile.cfg, hostile.log))
    asyncio.run(wait_http(hostile.url, 30))
    await_flush_s = 3.0  # the restarted festinad's first flushes
    time.sleep(await_flush_s)
    cut = [r for r in requests_since(hostile, last_id) if r[1] == "alice" and r[2] > SHORT_MAX_TOKENS]
    assert len(cut) == 1 and cut[0][2] < 4 * LONG_MAX_TOKENS, requests_since(hostile, last_id)
    with closing(sqlite3.connect(hostile.tmp / "festina.db")) as db:
        outcome, = db.execute("SELECT outcome FROM requests WHERE id = ?", (cut[0][0],)).fetchone()
        left, = db.execute("SELECT count(*) FROM requests_in_flight").fetchone()
    assert outcome == ("gateway_stopped" if sig == signal.SIGTERM else "gateway_crashed") and left == 0
