"""Builders shared by the tests: a synthetic profiles folder in tmp_path and a store over it.

Tests never read the shipped tables: they copy the shipped ``gpus.toml`` and
``models.toml`` and write one small table, llama-3.1-8b on h100-sxm-80gb,
whose latency and power follow simple closed forms (``synthetic_point``), so
a test can compute the expected answer at any grid point.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import PHASES, ProfileTable

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"

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
    root.mkdir(parents=True, exist_ok=True)
    for name in ("gpus.toml", "models.toml"):
        shutil.copy(REPO_PROFILES / name, root / name)
    synthetic_table().to_csv(root / SYNTHETIC_GPU / f"{SYNTHETIC_MODEL}.csv")
    return root


@pytest.fixture
def synthetic_profiles_dir(tmp_path: Path) -> Path:
    return make_profiles_dir(tmp_path / "profiles")


@pytest.fixture
def synthetic_store(synthetic_profiles_dir: Path) -> ProfileStore:
    return ProfileStore(synthetic_profiles_dir)
