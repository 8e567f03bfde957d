"""``festina dev-cluster``: status of a folder without a cluster, and bad options as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Festina


def test_status_without_a_cluster(festina: Festina, tmp_path: Path) -> None:
    result = festina("dev-cluster", "status", "--base-dir", str(tmp_path))
    assert (result.code, result.out) == (0, f"no dev cluster in {tmp_path}\n")
    shown = json.loads(festina("dev-cluster", "status", "--base-dir", str(tmp_path), "--json").out)
    assert shown["running"] is False and shown["daemons"] == []


def test_down_without_a_cluster(festina: Festina, tmp_path: Path) -> None:
    assert festina("dev-cluster", "down", "--base-dir", str(tmp_path)).out == f"nothing runs in {tmp_path}\n"


def test_bad_config_is_one_line(festina: Festina, tmp_path: Path) -> None:
    result = festina("dev-cluster", "up", "--base-dir", str(tmp_path), "--nodes", "0")
    assert (result.code, result.err) == (2, "festina: error: nodes = 0 must be in 1..64\n")


def test_status_lists_the_festina_node_daemons_and_the_shared_database(festina: Festina, tmp_path: Path) -> None:
    from festina_hpc.devcluster import STATE_FILE, DevClusterConfig

    cfg = DevClusterConfig(base_dir=tmp_path, nodes=2, db_url="postgresql+psycopg://festina:pw@127.0.0.1/test")
    (tmp_path / STATE_FILE).write_text(cfg.to_json())
    shown = json.loads(festina("dev-cluster", "status", "--base-dir", str(tmp_path), "--json").out)
    assert [d["name"] for d in shown["daemons"] if d["name"].startswith("festina-node")] == \
        ["festina-node n1", "festina-node n2"]
    assert shown["db_url"] == "postgresql+psycopg://festina:***@127.0.0.1/test"  # the password never printed
    text = festina("dev-cluster", "status", "--base-dir", str(tmp_path)).out
    assert "festina-node n2 stopped" in text


def test_bad_node_port_is_one_line(festina: Festina, tmp_path: Path) -> None:
    result = festina("dev-cluster", "up", "--base-dir", str(tmp_path), "--node-port", "27002")
    assert (result.code, result.err) == (2, "festina: error: node_port 27002: the festina-node ports overlap Slurm's\n")


def test_status_lists_the_ports_festinad_needs_to_reach_each_node(tmp_path: Path) -> None:
    from festina_hpc.cli.dev_cluster import _node_ports
    from festina_hpc.devcluster import DevClusterConfig

    cfg = DevClusterConfig(base_dir=tmp_path, nodes=3, node_port=28101)
    assert _node_ports(cfg) == {"n1": 28101, "n2": 28102, "n3": 28103}
    assert _node_ports(DevClusterConfig(base_dir=tmp_path, festina_node=False)) == {} == _node_ports(None)
