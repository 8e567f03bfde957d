"""festinad's node control: ``festina nodes set-clock`` through the admin API, signed by festinad, run by the node."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from festina_hpc.admin import client
from festina_hpc.admin.client import AdminApiError
from festina_hpc.cli.main import main
from festina_hpc.config import NodeControlConfig
from festina_hpc.daemon.admin_api import add_admin_routes
from festina_hpc.daemon.festinad import Festinad
from festina_hpc.daemon.node_control import NodeControlClient, NodeControlError, node_control_from_config
from festina_hpc.db.store import Store
from festina_hpc.errors import ConfigError
from festina_hpc.node.auth import MungeSigner, SecretSigner, Verifier
from festina_hpc.node.service import NetworkControlServer
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.server import running_app
from tests.daemon.test_festinad import FakeSlurm, _festinad, db  # noqa: F401  (db is a fixture)
from tests.node.conftest import SimNode, sim_node  # noqa: F401  (sim_node is a fixture)

KEY = b"q" * 32


@pytest.fixture
def node_port(sim_node: SimNode) -> Iterator[tuple[SimNode, int]]:  # noqa: F811
    # The node is the first of FakeSlurm's; every message must name it.
    server = NetworkControlServer(("127.0.0.1", 0), sim_node.agent, Verifier("n1", "secret", key=KEY))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield sim_node, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_set_clock_and_reset_through_festinad(store: ProfileStore, db: Store,  # noqa: F811
                                              node_port: tuple[SimNode, int],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    node, port = node_port

    async def scenario() -> None:
        festinad: Festinad = await _festinad(store, FakeSlurm(store), db)
        assert festinad.node_names[0] == "n1"
        app = web.Application()
        add_admin_routes(app, festinad)
        try:
            async with running_app(app) as url:
                with pytest.raises(AdminApiError, match=r"no channel to the nodes: set \[node_control\] port"):
                    await asyncio.to_thread(client.call, url, "POST", "/admin/node-control",
                                            {"node": "n1", "op": "status"})
                festinad.node_control = NodeControlClient(SecretSigner(KEY), port, address_of=lambda n: "127.0.0.1")
                code = await asyncio.to_thread(main, ["nodes", "set-clock", "n1", "0", "1200", "--festinad-url",
                                                      url])
                assert code == 0 and "n1 GPU 0: clock locked at 1200 MHz" in capsys.readouterr().out
                assert node.gpu.current_clock_mhz(0) == 1200
                for body, reason in [({"node": "nosuch", "op": "status"}, "is not a node of the cluster"),
                                     ({"node": "n1", "op": "mps_stop", "args": {"gpu": 0}}, "is not one of"),
                                     ({"node": "n2", "op": "status"}, "refused: meant for node 'n2'")]:
                    with pytest.raises(AdminApiError, match=reason):
                        await asyncio.to_thread(client.call, url, "POST", "/admin/node-control", body)
                code = await asyncio.to_thread(main, ["nodes", "reset-clock", "n1", "0", "--festinad-url", url])
                assert code == 0 and node.gpu.current_clock_mhz(0) == node.gpu.spec.max_clock_mhz
        finally:
            await festinad.close()

    asyncio.run(scenario())


def test_the_client_is_built_from_config(tmp_path: Path) -> None:
    assert node_control_from_config(NodeControlConfig(), str) is None
    assert isinstance(node_control_from_config(NodeControlConfig(port=9), str).signer, MungeSigner)  # type: ignore[union-attr]
    secret = tmp_path / "secret"
    secret.write_bytes(KEY)
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="lets group or others read"):
        node_control_from_config(NodeControlConfig(port=9, auth="secret", secret_file=str(secret)), str)
    secret.chmod(0o600)
    built = node_control_from_config(NodeControlConfig(port=9, auth="secret", secret_file=str(secret)), str)
    assert built is not None and built.signer.scheme == "secret"


def test_nodes_on_ports_of_their_own_are_reached_there(node_port: tuple[SimNode, int]) -> None:
    """``[node_control.ports]``: a dev cluster's nodes share one address, each on its own port."""
    sim, port = node_port
    client = NodeControlClient(SecretSigner(KEY), 0, address_of=lambda node: "127.0.0.1", ports={"n1": port})
    assert node_control_from_config(NodeControlConfig(ports={"n1": port}), str) is not None  # a table alone turns it on
    assert client.call("n1", "lock_clocks", {"gpu": 0, "clock_mhz": 1410}) == 1410
    with pytest.raises(NodeControlError, match=r"^festina-node n2 at 127\.0\.0\.1:0: "):
        client.call("n2", "lock_clocks", {"gpu": 0, "clock_mhz": 1410})  # not in the table, and no port
