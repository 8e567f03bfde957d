"""festinad-to-node control on the local Slurm cluster's munged: a signed message sets the clock; forged or replayed
ones (another payload's credential, another MUNGE key, garbage, the same message twice, an old one) change nothing on
the node and are logged."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from festina_hpc.daemon.node_control import NodeControlClient, NodeControlError
from festina_hpc.devcluster import DevClusterConfig, free_ports
from festina_hpc.node.auth import Munge, MungeSigner
from tests.node.conftest import live_node_cluster, private_munged

pytestmark = pytest.mark.slurm

PORT = free_ports(1, start=26500)


def node_config(cfg: DevClusterConfig) -> str:
    # No local policy: only these messages move the clock. Root signs here (festinad_user does not exist).
    return (f'control_policy = ""\ncontrol_port = {PORT}\ncontrol_addr = "127.0.0.1"\n'
            f'munge_socket = "{cfg.munge_socket}"\nfestinad_user = "festina-test-absent"\n')


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[DevClusterConfig, NodeControlClient]]:
    with live_node_cluster("festina-nctl-", 1, 26000, node_config) as cfg:
        client = NodeControlClient(MungeSigner(Munge(str(cfg.munge_socket))), PORT, address_of=lambda node: "127.0.0.1")
        deadline = time.monotonic() + 30
        while True:  # festina-node serve is starting
            try:
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"festina-node's control port {PORT} did not open") from None
                time.sleep(0.2)
        yield cfg, client


def clock_on_node(cfg: DevClusterConfig) -> int | None:
    """n1's GPU 0 clock as festina-node recorded it (read from its state file, not over the channel under test)."""
    path = cfg.base_dir / "node" / "n1" / "state.json"
    if not path.exists():
        return None
    clock: int | None = json.loads(path.read_text())["gpus"].get("0", {}).get("clock_mhz")
    return clock


def service_log(cfg: DevClusterConfig) -> str:
    return (cfg.base_dir / "log" / "festina-node-n1.log").read_text()


def test_a_signed_message_sets_the_clock(cluster: tuple[DevClusterConfig, NodeControlClient]) -> None:
    cfg, client = cluster
    assert client.set_clock("n1", 0, 1200) == 1200
    assert clock_on_node(cfg) == 1200
    assert client.reset_clock("n1", 0) is None
    assert clock_on_node(cfg) is None


def test_forged_and_replayed_messages_change_nothing_and_are_logged(
        cluster: tuple[DevClusterConfig, NodeControlClient]) -> None:
    cfg, client = cluster
    genuine = client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 1410})
    assert client.send("n1", genuine) == 1410
    with private_munged("festina-munge-rogue-") as rogue_socket:
        rogue = NodeControlClient(MungeSigner(Munge(str(rogue_socket))), PORT, address_of=lambda node: "127.0.0.1")
        other_key = rogue.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 600})
    old = NodeControlClient(client.signer, PORT, address_of=lambda node: "127.0.0.1", clock=lambda: time.time() - 120)
    attempts = [
        ("replayed", genuine, "Replayed credential"),
        ("another payload's credential",
         {**client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 1410}), "args": {"gpu": 0, "clock_mhz": 600}},
         "made for another message"),
        ("another MUNGE key", other_key, "Invalid credential"),
        ("garbage", {**genuine, "nonce": "f" * 32, "auth": {"scheme": "munge", "credential": "MUNGE:garbage:"}},
         "MUNGE credential refused"),
        ("old timestamp", old.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 600}), "outside the 30 s window"),
        ("another node's", client.sign("n2", "lock_clocks", {"gpu": 0, "clock_mhz": 600}), "meant for node 'n2'"),
    ]
    for case, wire, reason in attempts:
        with pytest.raises(NodeControlError, match=f"refused: .*{reason}"):
            client.send("n1", wire)
        assert clock_on_node(cfg) == 1410, case
    log = service_log(cfg)
    refused = "network control: refused op 'lock_clocks' from 127.0.0.1:"
    refusals = [line for line in log.splitlines() if refused in line]
    assert len(refusals) >= len(attempts)
    for _case, _wire, reason in attempts:
        assert any(reason.split(" ")[0] in line for line in refusals), reason
    client.reset_clock("n1", 0)


def test_a_credential_replayed_with_a_fresh_nonce_is_still_refused(
        cluster: tuple[DevClusterConfig, NodeControlClient]) -> None:
    """The nonce and timestamp are under the credential: changing them to dodge the replay check breaks it."""
    cfg, client = cluster
    genuine = client.sign("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 1005})
    assert client.send("n1", genuine) == 1005
    for dodge in ({"nonce": "0" * 32}, {"issued_unix_s": time.time()}):
        with pytest.raises(NodeControlError, match="refused"):
            client.send("n1", {**genuine, **dodge})
        assert clock_on_node(cfg) == 1005
    client.reset_clock("n1", 0)
