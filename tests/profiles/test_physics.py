"""festina_hpc.profiles.physics: the analytical model behaves like a GPU (with hand-chosen H100 parameters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from festina_hpc.errors import ProfileError
from festina_hpc.profiles.physics import (
    ArrayLike,
    FloatArray,
    PhysicsParams,
    load_params,
    params_table,
    step,
)
from tests.conftest import H100_PARAMS, make_params, shipped_catalog

BATCHES = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
CONTEXTS = (128, 1024, 4096)
MODELS = ("llama-3.1-8b", "llama-3.1-70b")


def run(model: str, phase: str, batch: ArrayLike, context: ArrayLike, sm_pct: ArrayLike, clock_mhz: ArrayLike,
        params: PhysicsParams = H100_PARAMS) -> tuple[FloatArray, FloatArray]:
    """``physics.step`` for ``model`` on the H100 at its shipped tensor parallelism."""
    catalog = shipped_catalog()
    gpu, spec = catalog.gpu("h100"), catalog.model(model)
    return step(gpu, spec, spec.tp_on(gpu.name), params, phase, batch, context, sm_pct, clock_mhz)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("clock_mhz", [1980, 1380, 900])
@pytest.mark.parametrize("context", CONTEXTS)
def test_decode_energy_per_token_falls_with_batch(model: str, clock_mhz: int, context: int) -> None:
    latency, power = run(model, "decode", BATCHES, context, 100, clock_mhz)
    tp = shipped_catalog().model(model).tp_on("h100-sxm-80gb")
    per_token = power * latency * tp / BATCHES
    assert np.all(np.diff(per_token) < 0), per_token


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_decode_barely_slows_at_70_percent_clock_while_power_drops(model: str, context: int) -> None:
    fast_latency, fast_power = run(model, "decode", BATCHES, context, 100, 1980)
    slow_latency, slow_power = run(model, "decode", BATCHES, context, 100, 0.7 * 1980)
    assert np.all(slow_latency >= fast_latency)
    assert np.all(slow_latency / fast_latency - 1 < 0.15), slow_latency / fast_latency
    assert np.all(slow_power < fast_power)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_prefill_slows_as_sm_share_falls(model: str, batch: int) -> None:
    sm_pcts = np.array([100, 75, 50, 25, 10])
    latency, _ = run(model, "prefill", batch, 1024, sm_pcts, 1980)
    assert np.all(np.diff(latency) > 0), latency


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_prefill_latency_is_roughly_inverse_to_clock(model: str, batch: int) -> None:
    clocks = np.array(sorted(shipped_catalog().gpu("h100").table_clocks_mhz))
    latency, _ = run(model, "prefill", batch, 1024, 100, clocks)
    # latency(f) / latency(max) against max / f: 1 when all time scaled with the clock. The
    # clock-independent share pulls it below: 1 - clock_time_frac of compute time, and the step
    # overhead, which is 15% of a batch-1 prefill (0.82 at 900 MHz).
    relative = (latency / latency[-1]) / (clocks[-1] / clocks)
    assert np.all((relative > 0.8) & (relative <= 1.0 + 1e-12)), relative
    assert np.all(np.diff(relative) > 0), relative


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("params", [H100_PARAMS, make_params(power_compute_w=2000.0, power_memory_w=800.0)],
                         ids=["hand params", "hot params"])
def test_power_never_exceeds_tdp_and_capping_only_stretches_time(phase: str, model: str,
                                                                 params: PhysicsParams) -> None:
    grid = np.meshgrid(BATCHES, CONTEXTS, [10, 25, 50, 100], [900, 1380, 1980], indexing="ij")
    latency, power = run(model, phase, *grid, params=params)
    tdp = shipped_catalog().gpu("h100").tdp_w
    assert np.all(power <= tdp)
    assert np.all(power > shipped_catalog().gpu("h100").idle_w)
    # Power parameters do not enter the timing model, so any difference in latency is the TDP stretch.
    cool_latency, _ = run(model, phase, *grid, params=make_params(power_compute_w=0.0, power_memory_w=0.0))
    stretched = latency > cool_latency
    assert np.all(latency >= cool_latency)
    assert np.all(power[stretched] == tdp)
    if params is not H100_PARAMS:
        assert stretched.any()


def test_step_broadcasts_and_rejects_unknown_phase() -> None:
    latency, power = run("llama-3.1-8b", "decode", [[1], [8]], [128, 1024, 4096], 100, 1980)
    assert latency.shape == power.shape == (2, 3)
    with pytest.raises(ValueError, match="phase = 'train'"):
        run("llama-3.1-8b", "train", 1, 128, 100, 1980)


def test_params_round_trip_through_calibration_toml(tmp_path: Path) -> None:
    path = tmp_path / "calibration.toml"
    path.write_text(params_table({"h100-sxm-80gb": H100_PARAMS}), encoding="utf-8")
    assert load_params(path) == {"h100-sxm-80gb": H100_PARAMS}
    path.write_text(params_table({"h100-sxm-80gb": H100_PARAMS}).replace("eff_memory = 0.8\n", ""), encoding="utf-8")
    with pytest.raises(ProfileError, match=r"\[h100-sxm-80gb\] is missing field eff_memory"):
        load_params(path)
    path.write_text(params_table({"h100-sxm-80gb": H100_PARAMS}).replace("eff_memory = 0.8\n", 'eff_memory = "x"\n'),
                    encoding="utf-8")
    with pytest.raises(ProfileError, match=r"\[h100-sxm-80gb\] field eff_memory must be a number, got 'x'"):
        load_params(path)
