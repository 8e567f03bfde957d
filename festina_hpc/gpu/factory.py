"""Builds the GPU backend the config asks for: NVML, simulated, or NVML when a GPU answers.

Called once by the CLI's ``main()`` (or a command), which passes the
``FESTINA_GPU_BACKEND`` environment variable in as ``backend_override``; the
library itself never reads the environment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from festina_hpc.config import GPU_BACKENDS, GpuConfig
from festina_hpc.errors import ConfigError, GpuError
from festina_hpc.gpu.base import GpuBackend
from festina_hpc.gpu.nvml import NvmlBackend
from festina_hpc.gpu.simulated import SimulatedGpuBackend
from festina_hpc.profiles.store import ProfileStore

logger = logging.getLogger(__name__)

Backend = NvmlBackend | SimulatedGpuBackend


def resolve_backend_name(config: GpuConfig, backend_override: str | None) -> str:
    """The backend name in force: the override (from the environment or a flag) wins over the config."""
    name = backend_override if backend_override else config.backend
    if name not in GPU_BACKENDS:
        raise ConfigError(f"gpu backend = {name!r} is not one of {', '.join(GPU_BACKENDS)}")
    return name


def make_gpu_backend(config: GpuConfig, store: ProfileStore, clock: Callable[[], float],
                     backend_override: str | None = None,
                     open_nvml: Callable[[], NvmlBackend] = NvmlBackend) -> Backend:
    """The backend for ``config`` (or ``backend_override``); ``clock`` drives the simulated one."""
    name = resolve_backend_name(config, backend_override)
    if name == "nvml":
        return open_nvml()
    if name == "auto":
        try:
            nvml = open_nvml()
        except GpuError as exc:
            logger.info("no NVML GPU (%s); using simulated %s GPUs", exc, config.simulated_type)
        else:
            if nvml.device_count() > 0:
                return nvml
            nvml.close()
            logger.info("NVML reports no GPU; using simulated %s GPUs", config.simulated_type)
    return SimulatedGpuBackend(store, config.simulated_type, config.simulated_count, clock)


if TYPE_CHECKING:
    # Makes mypy check that both backends satisfy the protocol.
    _BACKEND_CLASSES: tuple[type[GpuBackend], ...] = (NvmlBackend, SimulatedGpuBackend)
