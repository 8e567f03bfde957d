"""Builds the ``SlurmClient`` asked for: ``cli`` (Slurm's commands), ``pyslurm``, or ``auto``.

``auto`` takes pyslurm only when it imports and was built for the cluster's
Slurm major.minor (read with ``scontrol --version``); otherwise the CLI
backend, which works with any Slurm that has ``--json`` (21.08 and later).
Called once by ``main()`` or a fixture, which passes ``slurm_conf`` in; the
library does not read the environment.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from festina_hpc.errors import ConfigError
from festina_hpc.slurm.cli_backend import DEFAULT_TIMEOUT_S, CliSlurmClient
from festina_hpc.slurm.client import SlurmClient
from festina_hpc.slurm.errors import SlurmError
from festina_hpc.slurm.pyslurm_backend import PyslurmSlurmClient, pyslurm_version

logger = logging.getLogger(__name__)

SLURM_BACKENDS = ("auto", "cli", "pyslurm")


def import_pyslurm() -> Any:
    """The pyslurm module, or ``SlurmError`` saying why it cannot be used."""
    try:
        return importlib.import_module("pyslurm")
    except ImportError as exc:
        raise SlurmError(f"pyslurm is not importable ({exc}); pip install 'festina-hpc[slurm-pyslurm]' "
                         f"needs Slurm headers of the release pyslurm was made for") from exc


def make_slurm_client(backend: str = "auto", slurm_conf: Path | None = None, *,
                      timeout_s: float = DEFAULT_TIMEOUT_S,
                      load_pyslurm: Callable[[], Any] = import_pyslurm) -> CliSlurmClient | PyslurmSlurmClient:
    if backend not in SLURM_BACKENDS:
        raise ConfigError(f"slurm backend = {backend!r} is not one of {', '.join(SLURM_BACKENDS)}")
    cli = CliSlurmClient(slurm_conf, timeout_s=timeout_s)
    if backend == "cli":
        return cli
    try:
        module = load_pyslurm()
        wanted = pyslurm_version(module)
        cluster = cli.version()
        if wanted != cluster:
            raise SlurmError(f"pyslurm is built for Slurm {wanted[0]}.{wanted[1]:02d}, the cluster runs "
                             f"{cluster[0]}.{cluster[1]:02d}")
    except (SlurmError, ValueError) as exc:
        if backend == "pyslurm":
            raise SlurmError(f"pyslurm backend unusable: {exc}") from exc
        logger.info("using the Slurm CLI backend: %s", exc)
        return cli
    return PyslurmSlurmClient(module)


if TYPE_CHECKING:
    # Makes mypy check that both backends satisfy the protocol.
    _BACKEND_CLASSES: tuple[type[SlurmClient], ...] = (CliSlurmClient, PyslurmSlurmClient)
