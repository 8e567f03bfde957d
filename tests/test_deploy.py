"""deploy/: dashboard metrics are exported ones, units run as documented, slurm.conf lines are the dev cluster's."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from prometheus_client import generate_latest

from festina_hpc.accounting.metrics import GpuFigures, MetricsSnapshot, ModelFigures, build_registry
from festina_hpc.config import load_config
from festina_hpc.devcluster import DevClusterConfig, render_gres_conf, render_slurm_conf
from festina_hpc.node.config import load_node_config

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
