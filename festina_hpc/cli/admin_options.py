"""Options shared by the admin commands (models, status, consolidate, nodes, decisions)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from festina_hpc.cli.common import AppContext
from festina_hpc.errors import FestinaError
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


def api_key_option(func: F) -> F:
    # A file or the environment, never the command line: argv is readable by every user in ps.
    return click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                        metavar="FILE", help="A file (mode 600) holding an admin API key for festinad's /admin/* "
                                             "(default: $FESTINA_API_KEY; `festina keys create --role admin`).")(func)


def api_key(option: Path | None) -> str | None:
    """The admin key to send: from ``--api-key-file``, else ``$FESTINA_API_KEY``; None: send none."""
    if option is None:
        return os.environ.get("FESTINA_API_KEY", "").strip() or None
    try:
        mode = option.stat().st_mode
        text = option.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise FestinaError(f"api_key_file = '{option}' cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        raise FestinaError(f"api_key_file = '{option}' may be read by group or others (mode {mode & 0o777:o}): "
                           "chmod 600 it")
    if not text:
        raise FestinaError(f"api_key_file = '{option}' is empty")
    return text


def slurm_conf_option(func: F) -> F:
    return click.option("--slurm-conf", type=click.Path(path_type=Path), default=None,
                        help="slurm.conf of the cluster (default: $SLURM_CONF, else Slurm's own).")(func)


def slurm_client(app: AppContext, slurm_conf: Path | None) -> SlurmClient:
    from festina_hpc.slurm.factory import make_slurm_client

    conf = slurm_conf or (Path(os.environ["SLURM_CONF"]) if os.environ.get("SLURM_CONF") else None)
    return make_slurm_client(app.config.daemon.slurm_backend, conf, timeout_s=app.config.daemon.slurm_timeout_s)
