from __future__ import annotations

import pytest

from festina_hpc.config import GpuConfig
from festina_hpc.errors import ConfigError, GpuError
from festina_hpc.gpu.factory import make_gpu_backend, resolve_backend_name
from festina_hpc.gpu.nvml import NvmlBackend
from festina_hpc.gpu.simulated import ManualClock, SimulatedGpuBackend
from festina_hpc.profiles.store import ProfileStore
from tests.gpu import fake_pynvml
from tests.gpu.fake_pynvml import FakeNvml


def nvml_with(devices: int) -> FakeNvml:
    nvml = FakeNvml()
    nvml.devices = nvml.devices * devices
    return nvml


def no_nvml() -> NvmlBackend:
    nvml = FakeNvml()
    nvml.fail("nvmlInit", fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    return NvmlBackend(nvml)


@pytest.mark.parametrize("case,config_backend,override,expected", [
    ("config", "nvml", None, "nvml"),
    ("override wins", "nvml", "simulated", "simulated"),
    ("empty override", "simulated", "", "simulated"),
    ("auto", "auto", None, "auto"),
])
def test_backend_name(case: str, config_backend: str, override: str | None, expected: str) -> None:
    assert resolve_backend_name(GpuConfig(backend=config_backend), override) == expected


def test_a_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^gpu backend = 'cuda' is not one of auto, nvml, simulated$"):
        resolve_backend_name(GpuConfig(), "cuda")


def test_simulated_uses_the_configured_type_and_count(synthetic_store: ProfileStore) -> None:
    config = GpuConfig(backend="simulated", simulated_type="h100", simulated_count=3)
    backend = make_gpu_backend(config, synthetic_store, ManualClock(), open_nvml=no_nvml)
    assert isinstance(backend, SimulatedGpuBackend)
    assert backend.device_count() == 3
    assert backend.spec.name == "h100-sxm-80gb"


def test_auto_uses_nvml_when_a_gpu_answers(synthetic_store: ProfileStore) -> None:
    nvml = nvml_with(2)
    backend = make_gpu_backend(GpuConfig(), synthetic_store, ManualClock(), open_nvml=lambda: NvmlBackend(nvml))
    assert isinstance(backend, NvmlBackend)
    assert backend.device_count() == 2


def test_auto_falls_back_to_simulated_without_nvml_or_without_gpus(synthetic_store: ProfileStore) -> None:
    backend = make_gpu_backend(GpuConfig(), synthetic_store, ManualClock(), open_nvml=no_nvml)
    assert isinstance(backend, SimulatedGpuBackend)
    empty = nvml_with(0)
    backend = make_gpu_backend(GpuConfig(), synthetic_store, ManualClock(), open_nvml=lambda: NvmlBackend(empty))
    assert isinstance(backend, SimulatedGpuBackend)
    assert empty.initialised == 0  # the empty NVML was shut down again


def test_nvml_asked_for_explicitly_fails_loudly(synthetic_store: ProfileStore) -> None:
    with pytest.raises(GpuError, match="initialise NVML failed"):
        make_gpu_backend(GpuConfig(), synthetic_store, ManualClock(), backend_override="nvml", open_nvml=no_nvml)
