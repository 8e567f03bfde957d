"""Options shared by the admin commands (models, status, consolidate, nodes, decisions)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from festina_hpc.cli.common import AppContext
from festina_hpc.slurm.client import SlurmClient

F = TypeVar("F", bound=Callable[..., Any])


def festinad_url_option(func: F) -> F:
    return click.option("--festinad-url", default=None, metavar="URL",
                        help="festinad's gateway (default: $FESTINA_URL, else http://[daemon] host:port).")(func)


def festinad_url(app: AppContext, option: str | None) -> str:
    if option:
        return option
    if os.environ.get("FESTINA_URL"):
        return os.environ["FESTINA_URL"]
    return f"http://{app.config.daemon.host}:{app.config.daemon.port}"


def slurm_conf_option(func: F) -> F:
    return click.option("--slurm-conf", type=click.Path(path_type=Path), default=None,
                        help="slurm.conf of the cluster (default: $SLURM_CONF, else Slurm's own).")(func)


def slurm_client(app: AppContext, slurm_conf: Path | None) -> SlurmClient:
    from festina_hpc.slurm.factory import make_slurm_client

    conf = slurm_conf or (Path(os.environ["SLURM_CONF"]) if os.environ.get("SLURM_CONF") else None)
    return make_slurm_client(app.config.daemon.slurm_backend, conf, timeout_s=app.config.daemon.slurm_timeout_s)
