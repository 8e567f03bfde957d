"""festina-node's network control port with festinad's client: signed ops run; forged or replayed ones do nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from festina_hpc.daemon.node_control import NodeControlClient, NodeControlError
from festina_hpc.errors import ConfigError
from festina_hpc.node.auth import Munge, MungeSigner, SecretSigner, Verifier
from festina_hpc.node.config import NodeConfig
from festina_hpc.node.main import Invocation, build_network_server
from festina_hpc.node.service import NetworkControlServer, dispatch
from tests.node.conftest import SimNode, make_job, private_munged

KEY = b"s" * 32


@pytest.fixture
def network(sim_node: SimNode) -> Iterator[tuple[SimNode, NodeControlClient]]:
    server = NetworkControlServer(("127.0.0.1", 0), sim_node.agent, Verifier("n1", "secret", key=KEY))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    client = NodeControlClient(SecretSigner(KEY), server.server_address[1], address_of=lambda node: "127.0.0.1")
    yield sim_node, client
    server.shutdown()
    server.server_close()


def test_a_signed_request_sets_the_clock(network: tuple[SimNode, NodeControlClient]) -> None:
    node, client = network
    assert client.set_clock("n1", 0, 1200) == 1200
    assert node.gpu.current_clock_mhz(0) == 1200 and node.state.read().gpu(0).clock_mhz == 1200
    assert client.status("n1")["gpus"]["0"]["clock_mhz"] == 1200


def test_forged_and_replayed_requests_change_nothing_and_are_logged(
        network: tuple[SimNode, NodeControlClient], caplog: pytest.LogCaptureFixture) -> None:
    node, client = network
    first = client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 1500})
    assert client.send("n1", first) == 1500
    client.set_clock("n1", 0, 1200)
    forged = {**client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 900}), "args": {"gpu": 0, "clock_mhz": 600}}
    other_key = NodeControlClient(SecretSigner(b"x" * 32), client.port, address_of=lambda node: "127.0.0.1")
    for wire, reason in [(first, "already used"), (forged, "HMAC does not match"),
                         (other_key.sign("n1", "reset_clocks", {"gpu": 0}), "HMAC does not match"),
                         (client.sign("n2", "reset_clocks", {"gpu": 0}), "meant for node 'n2'"),
                         ({**client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 900}), "auth": None},
                          "no credential")]:
        with caplog.at_level(logging.WARNING, logger="festina_hpc.node.service"):
            with pytest.raises(NodeControlError, match=f"refused: .*{reason}"):
                client.send("n1", wire)
        assert node.gpu.current_clock_mhz(0) == 1200 and node.state.read().gpu(0).clock_mhz == 1200
    refusals = [r.getMessage() for r in caplog.records if "refused op" in r.getMessage()]
    assert len(refusals) == 5 and all("from 127.0.0.1:" in line for line in refusals)
    assert "refused op 'lock_clocks' from 127.0.0.1:" in refusals[0] and "already used" in refusals[0]


def test_an_old_message_is_refused(network: tuple[SimNode, NodeControlClient]) -> None:
    node, client = network
    stale = NodeControlClient(client.signer, client.port, address_of=lambda node: "127.0.0.1",
                              clock=lambda: time.time() - 60)
    with pytest.raises(NodeControlError, match="outside the 30 s window"):
        stale.set_clock("n1", 0, 900)
    assert node.gpu.current_clock_mhz(0) == node.gpu.spec.max_clock_mhz


def test_shares_are_requested_for_the_control_loop(network: tuple[SimNode, NodeControlClient]) -> None:
    node, client = network
    node.agent.prolog(make_job(71, mps_pct=50))
    client.set_shares("n1", 0, {71: 30.0}, clock_mhz=1400)
    gpu = node.state.read().gpu(0)
    assert gpu.jobs[0].desired_sm_pct == 30.0 and gpu.desired_clock_mhz == 1400
    with pytest.raises(NodeControlError, match="job 99 does not run on this GPU"):
        client.set_shares("n1", 0, {99: 30.0})


def test_drain_instance_signals_only_the_jobs_own_server(sim_node: SimNode) -> None:
    sim_node.agent.prolog(make_job(72, mps_pct=50))
    assert "no model server" in dispatch(sim_node.agent, "drain_instance", {"gpu": 0, "job_id": 72})["error"]
    # A stand-in server: a process of job 72 that reports SIGTERM by exiting 7.
    server = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\ntime.sleep(30)"],
                              env={**os.environ, "SLURM_JOB_ID": "72"})
    stranger = subprocess.Popen(["sleep", "30"], env={**os.environ, "SLURM_JOB_ID": "5"})
    try:
        time.sleep(0.3)
        sim_node.agent.plan_settings(0, None, {}, {72: stranger.pid})
        answer = dispatch(sim_node.agent, "drain_instance", {"gpu": 0, "job_id": 72})
        assert "no model server" in answer["error"] and stranger.poll() is None
        sim_node.agent.plan_settings(0, None, {}, {72: server.pid})
        assert dispatch(sim_node.agent, "drain_instance", {"gpu": 0, "job_id": 72}) == {"ok": True,
                                                                                         "result": server.pid}
        assert server.wait(timeout=10) == 7
    finally:
        for proc in (server, stranger):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_munge_signed_requests_over_the_port(sim_node: SimNode) -> None:
    with private_munged() as sock:
        munge = Munge(str(sock))
        server = NetworkControlServer(("127.0.0.1", 0), sim_node.agent,
                                      Verifier("n1", "munge", munge=munge, allowed_uids=frozenset({os.geteuid()})))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            client = NodeControlClient(MungeSigner(munge), server.server_address[1], address_of=lambda n: "127.0.0.1")
            signed = client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 1305})
            assert client.send("n1", signed) == 1305
            with pytest.raises(NodeControlError, match="refused: MUNGE credential refused: Replayed credential"):
                client.send("n1", signed)
            with pytest.raises(NodeControlError, match="refused: MUNGE credential was made for another message"):
                client.send("n1", {**client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 900}),
                                   "args": {"gpu": 0, "clock_mhz": 600}})
            assert sim_node.gpu.current_clock_mhz(0) == 1305
        finally:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize(("mode", "reason"), [(0o644, "mode 644 lets group or others read"), (0o640, "mode 640")])
def test_the_service_refuses_to_start_on_a_readable_secret(tmp_path: Path, mode: int, reason: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(KEY)
    secret.chmod(mode)
    cfg = NodeConfig(state_dir=str(tmp_path), control_port=1, control_auth="secret",
                     control_secret_file=str(secret))
    with pytest.raises(ConfigError, match=reason):
        build_network_server(Invocation(cfg, "n1", {}, None), agent=None)  # type: ignore[arg-type]


def test_the_port_is_off_unless_configured(tmp_path: Path) -> None:
    assert build_network_server(Invocation(NodeConfig(), "n1", {}, None), agent=None) is None  # type: ignore[arg-type]
