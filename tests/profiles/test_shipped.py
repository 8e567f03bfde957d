"""The shipped profiles: complete, physically sane, and exactly what the calibration writes."""

from __future__ import annotations

import filecmp
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from festina_hpc.config import default_profiles_dir
from festina_hpc.profiles.calibrate import calibrate
from festina_hpc.profiles.store import ProfileStore

SHIPPED = default_profiles_dir()
STORE = ProfileStore(SHIPPED)
PAIRS = STORE.shipped()


def test_every_gpu_and_model_is_shipped() -> None:
    assert {g for g, _ in PAIRS} >= {"h100-sxm-80gb", "a100-sxm-80gb"}
    models = {m for _, m in PAIRS}
    assert len(models) >= 6
    sizes = sorted(STORE.model(m).params_b for m in models)
    assert sizes[0] <= 8 and sizes[-1] >= 65
    assert len(PAIRS) == len(STORE.catalog.gpus) * len(STORE.catalog.models)


@pytest.mark.parametrize("gpu,model", PAIRS)
def test_energy_per_token_falls_with_batch(gpu: str, model: str) -> None:
    per_token = [STORE.predict(gpu, model, "decode", b, 1024).energy_per_token_j for b in (1, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(per_token, per_token[1:])), per_token


@pytest.mark.parametrize("gpu,model", PAIRS)
def test_decode_barely_clock_sensitive_while_power_drops(gpu: str, model: str) -> None:
    spec = STORE.gpu(gpu)
    low = 0.7 * spec.max_clock_mhz
    for batch in (1, 16, 64, 256):
        hi = STORE.predict(gpu, model, "decode", batch, 1024)
        lo = STORE.predict(gpu, model, "decode", batch, 1024, clock_mhz=round(low))
        assert abs(lo.latency_s / hi.latency_s - 1) < 0.15, (batch, hi.latency_s, lo.latency_s)
        assert lo.power_w < hi.power_w


@pytest.mark.parametrize("gpu,model", PAIRS)
def test_prefill_slows_as_sm_share_falls(gpu: str, model: str) -> None:
    table = STORE.table(gpu, model)
    shares = np.array([10, 20, 30, 50, 70, 100])
    for batch in (1, 8):
        latency = table.lookup_many("prefill", batch, 2048, shares, STORE.gpu(gpu).max_clock_mhz).latency_s
        assert np.all(np.diff(latency) < 0), latency


@pytest.mark.parametrize("gpu,model", PAIRS)
def test_power_between_idle_and_tdp(gpu: str, model: str) -> None:
    spec = STORE.gpu(gpu)
    table = STORE.table(gpu, model)
    assert table.power_w.min() >= spec.idle_w
    assert table.power_w.max() <= spec.tdp_w
    assert table.tp == STORE.model(model).tp_on(gpu)


def test_llama_8b_h100_energy_matches_public_figure() -> None:
    """ML.ENERGY reports 0.12-0.20 J/token for Llama-3.1-8B on H100 at batch 64."""
    prediction = STORE.predict("h100", "llama-3.1-8b", "decode", 64, 700)
    assert 0.10 <= prediction.energy_per_token_j <= 0.22


@dataclass(frozen=True)
class _Csv:
    header: list[str]
    keys: list[tuple[str, ...]]  # the grid point of each row (phase, batch, context, SM %, clock)
    values: np.ndarray  # latency and power per row


def _read_csv(path: Path) -> _Csv:
    lines = [line.split(",") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    header, rows = lines[0], lines[1:]
    return _Csv(header, [tuple(r[:-2]) for r in rows], np.array([[float(v) for v in r[-2:]] for r in rows]))


def test_calibration_reproduces_shipped_files(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(SHIPPED, profiles, ignore=shutil.ignore_patterns("*.csv", "CALIBRATION.md",
                                                                      "calibration.toml"))
    shutil.copytree(SHIPPED / "data", profiles / "data", dirs_exist_ok=True)
    report = calibrate(profiles, profiles / "data", profiles)
    for gpu, model in PAIRS:
        # Same grid, same figures to 1e-5: the last printed digit may differ between numpy/scipy
        # releases (a fit that lands on a rounding boundary), nothing more.
        relative = Path(gpu) / f"{model}.csv"
        ours, shipped = _read_csv(profiles / relative), _read_csv(SHIPPED / relative)
        assert ours.header == shipped.header and ours.keys == shipped.keys, relative
        np.testing.assert_allclose(ours.values, shipped.values, rtol=1e-5, err_msg=str(relative))
    assert filecmp.cmp(profiles / "calibration.toml", SHIPPED / "calibration.toml", shallow=False)
    h100_energy = next(r for r in report.errors
                       if r.dataset == "mlenergy-v2" and r.gpu == "h100-sxm-80gb" and r.metric == "energy_per_token_j")
    assert h100_energy.median_rel_err < 0.25
    assert h100_energy.held_out_median_rel_err is not None and h100_energy.held_out_median_rel_err < 0.25
    assert "mlenergy-v2" in (profiles / "CALIBRATION.md").read_text()
