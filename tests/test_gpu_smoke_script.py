"""scripts/gpu-smoke end to end on a fake NVML and stand-in kernels (the real run needs a GPU)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from festina_hpc.gpu.nvml import NvmlBackend
from tests.gpu import fake_pynvml
from tests.gpu.fake_pynvml import FakeDevice, FakeNvml

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-smoke"


def load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_smoke", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_smoke", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def stand_in_kernels(gpu_uuid: str, notes: list[str]) -> tuple[Any, dict[str, tuple[Callable[[], None], float, str]]]:
    torch = SimpleNamespace(cuda=SimpleNamespace(synchronize=lambda: None))

    def kernel() -> None:
        time.sleep(0.0005)

    return torch, {"matmul": (kernel, 1.0, "TFLOP"), "copy": (kernel, 2.0, "GB")}


def test_smoke_measures_both_kernels_at_two_clocks_and_resets(tmp_path: Path, synthetic_profiles_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    nvml = FakeNvml([FakeDevice(energy_step_mj=3_000)])
    out = tmp_path / "smoke.json"
    rc = load_script().main(["--seconds", "0.01", "--json", str(out), "--profiles-dir", str(synthetic_profiles_dir)],
                            open_backend=lambda: NvmlBackend(nvml), load_kernels=stand_in_kernels)
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["gpu_type"] == "h100-sxm-80gb"
    assert result["clocks_mhz"] == [1980, 1380]
    assert [(row["clock_mhz"], row["kernel"]) for row in result["kernels"]] == [
        (1980, "matmul"), (1980, "copy"), (1380, "matmul"), (1380, "copy")]
    for row in result["kernels"]:
        assert row["energy_j"] == pytest.approx(3.0)
        assert row["prediction"]["phase"] == ("prefill" if row["kernel"] == "matmul" else "decode")
        assert row["predicted_slowdown"] >= 1.0
    assert nvml.devices[0].locked_mhz is None
    assert result["readings"]["sm_clock_mhz_after_reset"] == 1755
    readings = result["readings"]  # the fake GPU draws 123.456 W whatever it does
    assert readings["idle_w"] == pytest.approx(123.456) and readings["idle_with_context_w"] == pytest.approx(123.456)
    assert readings["profile_idle_with_context_w"] > readings["profile_idle_w"]
    report = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in report and "prefill b=8 c=2048" in report
    assert "idle 123.5 W without a CUDA context, 123.5 W with one held (profile: 70 W and 96 W)" in report


def test_smoke_without_clock_permission_measures_once_at_default_clocks(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    nvml = FakeNvml([FakeDevice(energy_step_mj=3_000)])
    nvml.fail("nvmlDeviceSetGpuLockedClocks", fake_pynvml.NVML_ERROR_NO_PERMISSION)
    out = tmp_path / "smoke.json"
    rc = load_script().main(["--seconds", "0.01", "--json", str(out), "--profiles-dir", str(tmp_path / "none")],
                            open_backend=lambda: NvmlBackend(nvml), load_kernels=stand_in_kernels)
    assert rc == 0
    result = json.loads(out.read_text())
    assert any(note.startswith("no profile prediction: ") for note in result["notes"])
    assert all(row["prediction"] is None for row in result["kernels"])
    assert [(row["clock_mhz"], row["kernel"]) for row in result["kernels"]] == [(None, "matmul"), (None, "copy")]
    assert any("no permission to lock clocks" in note for note in result["notes"])
    assert "default (1755)" in capsys.readouterr().out


def test_smoke_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    nvml = FakeNvml()
    nvml.lost = True
    rc = load_script().main(["--seconds", "0.01"], open_backend=lambda: NvmlBackend(nvml),
                            load_kernels=stand_in_kernels)
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("gpu-smoke: error: GPU 0: ") and err.count("\n") == 1
