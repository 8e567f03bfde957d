"""deploy/: dashboard metrics are exported ones, units run as documented, slurm.conf lines are the dev cluster's,
and the shipped configs bind nothing open that is not protected."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from prometheus_client import generate_latest

from festina_hpc.accounting.metrics import GpuFigures, MetricsSnapshot, ModelFigures, build_registry
from festina_hpc.config import Config, config_from_mapping, load_config
from festina_hpc.daemon.admin_api import is_loopback
from festina_hpc.devcluster import DevClusterConfig, render_gres_conf, render_slurm_conf
from festina_hpc.node.auth import SCHEMES
from festina_hpc.node.config import NodeConfig, load_node_config, node_config_from_mapping

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _exported_names() -> set[str]:
    snapshot = MetricsSnapshot(gpus=(GpuFigures("n1", 0, 300.0, 10.0),),
                               models=(ModelFigures("m", 100.0, 5.0, 0.9, 3),),
                               decisions_per_s=1.0, decisions=4, powered_nodes=1, nodes=2)
    text = generate_latest(build_registry(snapshot)).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "festina-dashboard.json").read_text())
    exported = _exported_names()
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"festina_[a-z_]+", target["expr"])}
    assert used and used <= exported, used - exported
    assert {"festina_gpu_power_watts", "festina_model_slo_attainment_ratio", "festina_nodes_powered"} <= used


def test_systemd_units() -> None:
    festinad = (DEPLOY / "systemd" / "festinad.service").read_text()
    node = (DEPLOY / "systemd" / "festina-node.service").read_text()
    assert "User=festina" in festinad and "ExecStart=/opt/festina/venv/bin/festinad" in festinad
    assert "User=root" in node and "festina-node serve" in node


def test_example_configs_load(tmp_path: Path) -> None:
    config = load_config(DEPLOY / "festina.toml")
    assert config.daemon.engine == "vllm" and config.daemon.port == 8000
    assert tomllib.loads((DEPLOY / "festina-node.toml").read_text())["node"]["service_user"] == "festina"
    node = load_node_config(DEPLOY / "festina-node.toml")
    assert node.control_port == config.node_control.port > 0 and node.control_auth == config.node_control.auth
    assert node.live_share_change is config.gpu.live_share_change is False


def _settings(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
                and not line.startswith(("NodeName", "Name")))


def test_slurm_lines_are_the_dev_clusters(tmp_path: Path) -> None:
    shipped = _settings((DEPLOY / "slurm" / "slurm.conf.festina").read_text())
    dev = _settings(render_slurm_conf(DevClusterConfig(base_dir=tmp_path)))
    for key in ("GresTypes", "Prolog", "Epilog", "TaskProlog", "SuspendProgram", "ResumeProgram"):
        assert Path(shipped[key]).name == Path(dev[key]).name if key != "GresTypes" else shipped[key] == dev[key]
    gres = (DEPLOY / "slurm" / "gres.conf").read_text()
    assert "Name=mps Count=800" in gres and "Name=mps" in render_gres_conf(DevClusterConfig(base_dir=tmp_path))


def _local(host: str) -> bool:
    return host == "localhost" or is_loopback(host)


def exposure_problems(config: Config) -> list[str]:
    """What a festina.toml leaves open to the network without protection (docs/admin-guide.md, "What is open")."""
    daemon, problems = config.daemon, []
    if not _local(daemon.host) and not config.gateway.require_keys:
        problems.append(f"gateway on {daemon.host} without [gateway] require_keys = true")
    metrics = daemon.metrics_address()
    if metrics is not None and not _local(metrics[0]):
        problems.append(f"metrics (no authentication) on {daemon.metrics_listen}")
    if daemon.admin_open and not config.gateway.require_keys:
        problems.append("[daemon] admin_open = true without keys: /admin/* open to anyone")
    return problems


def node_exposure_problems(node: NodeConfig) -> list[str]:
    problems = []
    if node.metrics_port and not _local(node.metrics_addr):
        problems.append(f"node metrics (no authentication) on {node.metrics_addr}:{node.metrics_port}")
    if node.control_port and node.control_auth not in SCHEMES:
        problems.append(f"control port {node.control_port} without signed messages")
    return problems


def test_shipped_configs_bind_nothing_open_unprotected() -> None:
    shipped = sorted(DEPLOY.glob("*.toml"))
    assert {p.name for p in shipped} == {"festina.toml", "festina-node.toml"}  # a new one must be checked here too
    config = load_config(DEPLOY / "festina.toml")
    assert exposure_problems(config) == []
    assert config.gateway.require_keys and not config.daemon.admin_open
    assert config.daemon.metrics_address() == ("127.0.0.1", 9464)
    assert node_exposure_problems(load_node_config(DEPLOY / "festina-node.toml")) == []


def test_the_exposure_check_finds_what_is_open() -> None:
    open_gateway = config_from_mapping({"daemon": {"host": "0.0.0.0"}, "gateway": {"require_keys": False}})
    assert exposure_problems(open_gateway) == ["gateway on 0.0.0.0 without [gateway] require_keys = true"]
    loud = config_from_mapping({"daemon": {"metrics_listen": "0.0.0.0:9464", "admin_open": True}})
    assert len(exposure_problems(loud)) == 2
    assert exposure_problems(config_from_mapping({})) == []  # the defaults: loopback, keys off, admin loopback only
    node = node_config_from_mapping({"metrics_port": 9400, "metrics_addr": "0.0.0.0"}, "<test>")
    assert node_exposure_problems(node) == ["node metrics (no authentication) on 0.0.0.0:9400"]
