"""``festina config``: show the resolved configuration."""

from __future__ import annotations

import click

from festina_hpc.cli.common import AppContext, echo_json, pass_app
from festina_hpc.config import config_as_dict


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@pass_app
def show(app: AppContext) -> None:
    """Print the resolved config (defaults filled in) as JSON."""
    echo_json(config_as_dict(app.config))
