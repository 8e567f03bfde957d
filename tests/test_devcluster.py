"""The dev cluster's generated config and its checks (starting one is covered by tests/slurm/test_live.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from festina_hpc import devcluster
from festina_hpc.devcluster import DevClusterConfig, DevClusterError


def conf_lines(cfg: DevClusterConfig) -> dict[str, str]:
    out = {}
    for line in devcluster.render_slurm_conf(cfg).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_slurm_conf_has_ports_paths_gres_power_saving_and_hooks(tmp_path: Path) -> None:
    cfg = DevClusterConfig(base_dir=tmp_path, ctld_port=30000, slurmd_port=30001, plugins_dir=Path("/p"))
    conf = conf_lines(cfg)
    assert conf["SlurmctldPort"] == "30000" and "Port=30001-30004" in conf["NodeName"]
    assert conf["NodeName"].startswith("n[1-4] ") and "Gres=gpu:h100:2,mps:200" in conf["NodeName"]
    assert conf["GresTypes"] == "gpu,mps"
    assert conf["AuthInfo"] == f"socket={tmp_path}/munge/munge.socket,cred_expire=10"
    assert (conf["SuspendProgram"], conf["ResumeProgram"]) == ("/p/suspend", "/p/resume")
    assert (conf["Prolog"], conf["Epilog"], conf["TaskProlog"]) == ("/p/prolog", "/p/epilog", "/p/task_prolog")
    assert conf["SuspendTime"] == "10" and conf["SuspendExcNodes"] == "n1,n2,n3"
    assert conf["SlurmdPidFile"] == f"{tmp_path}/run/slurmd-%n.pid"


def test_gres_conf_backs_gpus_and_mps_with_device_files(tmp_path: Path) -> None:
    text = devcluster.render_gres_conf(DevClusterConfig(base_dir=tmp_path, gpus_per_node=4))
    assert text == (f"AutoDetect=off\nName=gpu Type=h100 File={tmp_path}/dev/nvidia[0-3]\n"
                    f"Name=mps Count=400 File={tmp_path}/dev/nvidia[0-3]\n")


def test_every_node_may_power_down() -> None:
    cfg = DevClusterConfig(power_save_nodes=4)
    assert "SuspendExcNodes" not in conf_lines(cfg) and cfg.power_save_node_names == ("n1", "n2", "n3", "n4")


def test_nodes_share_the_hooks_state_and_one_database_each_with_its_own_port(tmp_path: Path) -> None:
    """festina-node serve of n2 reads the hooks' state dir and database (so a prolog's job is the service's) and
    takes festinad's signed requests on its own port; the database is the one `up` prints."""
    from festina_hpc.node.config import load_node_config

    cfg = DevClusterConfig(base_dir=tmp_path, node_port=31000)
    assert cfg.database_url == f"sqlite:///{tmp_path}/festina.db"
    (tmp_path / "hooks.toml").write_text(devcluster.render_node_config(cfg))
    (tmp_path / "n2.toml").write_text(devcluster.render_node_config(cfg, "n2"))
    hooks, n2 = load_node_config(tmp_path / "hooks.toml"), load_node_config(tmp_path / "n2.toml")
    assert (n2.state_dir, n2.db_url, n2.slurm_conf) == (hooks.state_dir, hooks.db_url, hooks.slurm_conf)
    assert n2.db_url == cfg.database_url and hooks.control_port == 0
    assert (n2.control_port, n2.control_addr, n2.munge_socket) == (31001, "127.0.0.1", str(cfg.munge_socket))
    pg = DevClusterConfig(base_dir=tmp_path, db_url="postgresql+psycopg://festina@127.0.0.1/test")
    (tmp_path / "pg.toml").write_text(devcluster.render_node_config(pg, "n1"))
    assert load_node_config(tmp_path / "pg.toml").db_url == pg.database_url == pg.db_url
    names = [d.name for d in devcluster.daemons(cfg)]
    assert names[-4:] == ["festina-node n1", "festina-node n2", "festina-node n3", "festina-node n4"]
    assert not any("festina-node" in d.name
                   for d in devcluster.daemons(DevClusterConfig(base_dir=tmp_path, festina_node=False)))


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    cfg = DevClusterConfig(base_dir=tmp_path, nodes=5, suspend_time_s=30)
    assert DevClusterConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(("fields", "message"), [
    ({"nodes": 0}, "nodes = 0 must be in 1..64"),
    ({"power_save_nodes": 5}, "power_save_nodes = 5 must be in 0..4"),
    ({"ctld_port": 80}, "ctld_port = 80"),
    ({"ctld_port": 27002}, "ctld_port 27002 falls in the slurmd ports"),
    ({"base_dir": Path("rel")}, "must be absolute"),
    ({"node_port": 27003}, "festina-node ports overlap Slurm's"),
    ({"node_port": 26815}, "festina-node ports overlap Slurm's"),
    ({"node_port": 70000}, "node_port = 70000"),
])
def test_bad_config_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(DevClusterError, match=message):
        DevClusterConfig(**fields)  # type: ignore[arg-type]


def test_status_of_an_empty_folder(tmp_path: Path) -> None:
    st = devcluster.status(tmp_path)
    assert st.config is None and not st.running and devcluster.down(tmp_path) == ()


def test_stale_pid_files_are_not_running(tmp_path: Path) -> None:
    cfg = DevClusterConfig(base_dir=tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / devcluster.STATE_FILE).write_text(cfg.to_json())
    (tmp_path / "run" / "slurmctld.pid").write_text("1\n")  # PID 1 is alive but is not slurmctld
    st = devcluster.status(tmp_path)
    assert [(d.name, d.pid, d.running) for d in st.daemons][:2] == [("munged", None, False), ("slurmctld", 1, False)]


def test_a_foreign_folder_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(DevClusterError, match="is not empty and holds no dev cluster"):
        devcluster._prepare_base_dir(DevClusterConfig(base_dir=tmp_path))


def test_plugins_are_executable_and_fail_open() -> None:
    plugins = devcluster.default_plugins_dir()
    for name in ("prolog", "epilog", "task_prolog", "suspend", "resume"):
        assert (plugins / name).stat().st_mode & 0o111, name


@pytest.mark.skipif(os.geteuid() != 0, reason="install_packages refuses to run without root")
def test_install_runs_apt_get_as_argv_with_services_blocked(tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    seen: list[tuple[list[str], str, bool]] = []

    def run(argv: list[str], env: dict[str, str], timeout_s: float) -> None:
        seen.append((argv, env["DEBIAN_FRONTEND"], policy.read_text().endswith("exit 101\n")))

    said: list[str] = []
    devcluster.install_packages(run, policy_rc_d=policy, progress=lambda text: said.append(f"{len(seen)}: {text}"))
    assert seen == [(["apt-get", "update", "-q"], "noninteractive", True),
                    (["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurmctld", "slurmd",
                      "slurm-client", "munge"], "noninteractive", True)]
    assert not policy.exists()  # removed: we wrote it
    # Each step is said before it runs (the count is of the apt-get commands already run).
    assert said == ["0: installing: apt-get update (package lists; up to 5 minutes)",
                    "1: installing: apt-get install slurmctld slurmd slurm-client munge (up to 10 minutes)",
                    "2: installed slurmctld slurmd slurm-client munge"]


def test_install_keeps_an_existing_policy_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install_packages refuses to run without root")
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")
    devcluster.install_packages(lambda argv, env, timeout_s: None, policy_rc_d=policy)
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"
