"""Builders shared by the tests: physics parameters, profile tables and a profiles folder in tmp_path.

Tests of the profile machinery never read the shipped tables: they copy the
shipped ``gpus.toml``/``models.toml`` and write their own tables, either from
``physics.step`` with hand-chosen, plausible H100 parameters (``make_table``)
or from simple closed forms (``synthetic_table``), so a test can compute the
expected answer at any grid point.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from festina_hpc.devcluster import DEFAULT_BASE_DIR, DevClusterConfig, base_dir_of, free_ports, missing_binaries
from festina_hpc.devcluster import down as devcluster_down
from festina_hpc.devcluster import status as devcluster_status
from festina_hpc.devcluster import up as devcluster_up
from festina_hpc.profiles.physics import PhysicsParams, step
from festina_hpc.profiles.specs import Catalog
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import PHASES, ProfileTable

# A shell that ran `eval "$(festina dev-cluster up)"` (CI does) exports the dev cluster's database, which
# would override every test's own: each test names its database itself.
os.environ.pop("FESTINA_DB_URL", None)

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"

H100_PARAMS = PhysicsParams(
    eff_compute=0.6, eff_memory=0.8, step_overhead_s=0.002, layer_overhead_s=0.0001, seq_overhead_s=0.0002,
    power_compute_w=500.0,
    power_memory_w=150.0, power_overhead_w=100.0, voltage_floor=0.8, voltage_knee_frac=0.75,
    clock_time_frac=0.85)

BATCHES = (1, 8, 64, 256)
CONTEXTS = (128, 1024, 4096)
SM_PCTS = (25, 50, 100)


def make_params(**overrides: Any) -> PhysicsParams:
    return replace(H100_PARAMS, **overrides)


def shipped_catalog() -> Catalog:
    return Catalog.load(REPO_PROFILES)


def make_table(gpu: str = "h100-sxm-80gb", model: str = "llama-3.1-8b", *, batch: Sequence[float] = BATCHES,
               context: Sequence[float] = CONTEXTS, sm_pct: Sequence[float] = SM_PCTS,
               clock_mhz: Sequence[float] | None = None, params: PhysicsParams = H100_PARAMS,
               notes: Sequence[str] = ("made by tests/conftest.py",)) -> ProfileTable:
    """A full-grid table of ``physics.step``; clocks default to the GPU's table clocks."""
    catalog = shipped_catalog()
    gpu_spec, model_spec = catalog.gpu(gpu), catalog.model(model)
    tp = model_spec.tp_on(gpu_spec.name)
    clocks = sorted(gpu_spec.table_clocks_mhz) if clock_mhz is None else list(clock_mhz)
    axes = [list(batch), list(context), list(sm_pct), clocks]
    grid = np.meshgrid(*axes, indexing="ij")
    latency = np.empty((len(PHASES), *grid[0].shape))
    power = np.empty_like(latency)
    for p, phase in enumerate(PHASES):
        latency[p], power[p] = step(gpu_spec, model_spec, tp, params, phase, *grid)
    return ProfileTable(gpu_spec.name, model_spec.name, tp, axes, latency, power, notes)


def write_profiles_dir(root: Path, tables: Sequence[ProfileTable]) -> Path:
    """A profiles folder: the shipped specs plus ``tables`` at <gpu>/<model>.csv."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("gpus.toml", "models.toml"):
        shutil.copy(REPO_PROFILES / name, root / name)
    for table in tables:
        table.to_csv(root / table.gpu / f"{table.model}.csv")
    return root


def write_config(path: Path, text: str) -> Path:
    """A festina config file holding ``text``."""
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    """H100 tables for llama-3.1-8b (tp=1) and llama-3.1-70b (tp=4)."""
    return write_profiles_dir(tmp_path / "profiles", [make_table(model="llama-3.1-8b"),
                                                      make_table(model="llama-3.1-70b")])


SYNTHETIC_GPU = "h100-sxm-80gb"
SYNTHETIC_MODEL = "llama-3.1-8b"
SYNTHETIC_BATCHES = (1, 8, 64)
SYNTHETIC_CONTEXTS = (512, 2048)
SYNTHETIC_SM_PCTS = (50, 100)
SYNTHETIC_CLOCKS_MHZ = (900, 1500, 1980)
MAX_CLOCK_MHZ = 1980
IDLE_W = 70.0


def synthetic_point(phase: str, batch: float, context_tokens: float, sm_pct: float,
                    clock_mhz: float) -> tuple[float, float]:
    """(latency_s, power_w): prefill is compute-bound (slows with lower clock and SM share) and draws
    up to 570 W; decode is memory-bound (barely clock-sensitive) and draws much less."""
    f = clock_mhz / MAX_CLOCK_MHZ
    s = sm_pct / 100.0
    if phase == "prefill":
        latency_s = 0.004 + batch * context_tokens * 2e-5 * (0.8 / f + 0.2) / s
        power_w = IDLE_W + 500.0 * s * f**2
    else:
        latency_s = (0.006 + 1e-4 * batch + 2e-8 * batch * context_tokens) * (0.1 / f + 0.9)
        power_w = IDLE_W + (100.0 + batch) * s * f
    return latency_s, power_w


def synthetic_table() -> ProfileTable:
    axes = [SYNTHETIC_BATCHES, SYNTHETIC_CONTEXTS, SYNTHETIC_SM_PCTS, SYNTHETIC_CLOCKS_MHZ]
    shape = (len(PHASES), *(len(a) for a in axes))
    latency = np.zeros(shape)
    power = np.zeros(shape)
    for index in np.ndindex(*shape):
        p, *rest = index
        point = [axes[k][rest[k]] for k in range(4)]
        latency[index], power[index] = synthetic_point(PHASES[p], *point)
    return ProfileTable(SYNTHETIC_GPU, SYNTHETIC_MODEL, 1, [list(a) for a in axes], latency, power,
                        ["synthetic table made by tests/conftest.py"])


def make_profiles_dir(root: Path) -> Path:
    """A profiles folder: the shipped specs plus the synthetic table."""
    return write_profiles_dir(root, [synthetic_table()])


@pytest.fixture
def synthetic_profiles_dir(tmp_path: Path) -> Path:
    return make_profiles_dir(tmp_path / "profiles")


@pytest.fixture
def synthetic_store(synthetic_profiles_dir: Path) -> ProfileStore:
    return ProfileStore(synthetic_profiles_dir)


# -- the local Slurm cluster -------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a real Slurm cluster (the slurm_cluster fixture)")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[DevClusterConfig]:
    """A running dev cluster: the one SLURM_CONF names, else the one in the default base dir, else a fresh one.

    A fresh one is started (and stopped again) in a temporary folder on free ports, so a developer's own
    cluster and a concurrent test run are left alone. Skips, saying why, only when Slurm is not installed or
    we are not root (slurmd must be).
    """
    candidates = [base_dir_of(Path(os.environ["SLURM_CONF"]))] if os.environ.get("SLURM_CONF") else []
    for base in [*candidates, DEFAULT_BASE_DIR]:
        current = devcluster_status(base)
        if current.running and current.config is not None:
            yield current.config
            return
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm binaries absent ({', '.join(missing)}): run `festina dev-cluster up --install` "
                    f"or apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("a dev cluster runs slurmd as root; run the tests as root or start one with sudo")
    # A short path: the munge socket path must fit in a sockaddr_un (108 bytes).
    base = Path(tempfile.mkdtemp(prefix="festina-slurm-", dir="/tmp"))
    ctld_port = free_ports(1, start=31000)
    slurmd_port = free_ports(4, start=ctld_port + 1)
    cfg = DevClusterConfig(base_dir=base, ctld_port=ctld_port, slurmd_port=slurmd_port,
                           node_port=free_ports(4, start=slurmd_port + 4))
    devcluster_up(cfg)
    try:
        yield cfg
    finally:
        devcluster_down(base)
        shutil.rmtree(base, ignore_errors=True)
