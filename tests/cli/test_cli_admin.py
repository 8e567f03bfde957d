"""``festina nodes``, ``festina decisions``, ``festina completion`` and consolidate's refusals without festinad."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from festina_hpc.db.engine import make_engine
from festina_hpc.db.store import GpuRecord, NodeRecord, Store
from festina_hpc.devcluster import DevClusterConfig
from festina_hpc.policy.types import GpuSettings, Plan, PowerOff
from tests.cli.conftest import NOT_A_TIME, Festina


def test_decisions_lists_the_audit_trail(festina: Festina, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert festina("db", "upgrade", "--db-url", url).code == 0
    engine = make_engine(url)
    now = datetime.now(UTC)
    Store(engine).record_plan(Plan((PowerOff(3),), "power off empty nodes"), at=now - timedelta(minutes=5))
    Store(engine).record_plan(Plan((PowerOff(4),), "old"), at=now - timedelta(days=2))
    engine.dispose()
    text = festina("decisions", "--since", "1h", "--db-url", url).out
    # nodes 3 and 4 are not in the database: their ids stand in for the names
    assert "power_off" in text and "node_id=3" in text and "-- power off empty nodes" in text
    assert "node_id=4" not in text
    data = json.loads(festina("decisions", "--since", "3d", "--kind", "power", "--json", "--db-url", url).out)
    assert [d["node_id"] for d in data["decisions"]] == [4, 3]
    bad = festina("decisions", "--since", "last tuesday", "--db-url", url)
    assert (bad.code, bad.err) == (2, f"festina: error: Invalid value for '--since': 'last tuesday' {NOT_A_TIME}\n")
    assert festina("decisions", "--kind", "nap", "--db-url", url).code == 2


def test_decisions_name_nodes_and_gpu_indexes_and_count_repeats(festina: Festina, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert festina("db", "upgrade", "--db-url", url).code == 0
    engine = make_engine(url)
    store = Store(engine)
    # ids and names disagree on purpose (n3 is the first node, gpu1 not its first GPU): the output shows names
    store.upsert_nodes([NodeRecord(name, "idle", True, 2) for name in ("n3", "n1")])
    gpus = store.upsert_gpus([GpuRecord(node, index, "h100-sxm-80gb") for node in ("n3", "n1") for index in (1, 0)])
    n1 = {n.name: n.id for n in store.load_live_state().nodes}["n1"]
    start = datetime.now(UTC) - timedelta(minutes=10)
    store.record_settings(gpus[("n3", 1)], GpuSettings(clock_mhz=1410), at=start, reason="decode-heavy")
    for k in range(3):  # every 30 s, the same empty node
        store.record_plan(Plan((PowerOff(n1),), "power_off empty nodes"), at=start + timedelta(seconds=30 * k))
    engine.dispose()
    setting, power = festina("decisions", "--since", "1h", "--db-url", url).out.strip().splitlines()
    assert " n3 gpu1 " in setting and "gpu=" not in setting and "node=" not in setting
    last = (start + timedelta(seconds=60)).isoformat(timespec="seconds")
    assert f" n1 (x3, last {last})  -- power_off empty nodes" in power
    data = json.loads(festina("decisions", "--since", "1h", "--json", "--db-url", url).out)["decisions"]
    assert [(d["node"], d["gpu_index"], d["count"]) for d in data] == [("n3", 1, 1), ("n1", None, 3)]
    assert data[1]["last_decided_at"] == (start + timedelta(seconds=60)).isoformat()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(festina: Festina, shell: str) -> None:
    result = festina("completion", shell)
    assert result.code == 0 and "_FESTINA_COMPLETE" in result.out


def test_bash_completion_completes_commands() -> None:
    env = {"_FESTINA_COMPLETE": "bash_complete", "COMP_WORDS": "festina mod", "COMP_CWORD": "1", "PATH": "/usr/bin"}
    import sys
    out = subprocess.run([sys.executable, "-c", "from festina_hpc.cli.main import cli; cli(prog_name='festina')"],
                         env=env, capture_output=True, text=True, check=False).stdout
    assert "plain,models" in out


def test_consolidate_without_festinad_is_one_line(festina: Festina) -> None:
    result = festina("consolidate", "--dry-run", "--festinad-url", "http://127.0.0.1:9")
    assert result.code == 2 and "festinad does not answer at http://127.0.0.1:9" in result.err
    assert festina("consolidate", "--plan-id", "abc", "--festinad-url", "http://127.0.0.1:9").code == 2


def test_help_texts_carry_examples(festina: Festina) -> None:
    for argv in (["models", "add"], ["status"], ["consolidate"], ["decisions"], ["nodes"], ["completion"]):
        assert "Examples:" in festina(*argv, "--help").out, argv


@pytest.mark.slurm
def test_nodes_drain_and_resume_on_the_dev_cluster(festina: Festina, slurm_cluster: DevClusterConfig,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
    unknown = festina("nodes", "drain", "nope", "--reason", "test")
    assert unknown.code == 2 and "node = 'nope' is not a Slurm node (known: n1, n2, n3, n4)" in unknown.err
    assert festina("nodes", "resume", "nope").code == 2
    assert "Missing option '--reason'" in festina("nodes", "drain", "n3").err
    try:
        assert festina("nodes", "drain", "n3", "--reason", "festina-admin-test").code == 0
        sinfo = subprocess.run(["sinfo", "-h", "-R", "-N", "-o", "%N %E"], capture_output=True, text=True, check=True,
                               env={"SLURM_CONF": str(slurm_cluster.slurm_conf), "PATH": "/usr/bin"}).stdout
        assert "n3 festina-admin-test" in sinfo
    finally:
        assert festina("nodes", "resume", "n3").code == 0
