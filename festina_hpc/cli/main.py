"""Entry point of the ``festina`` command: loads the config once and dispatches.

A ``FestinaError`` (bad input, bad config, bad profile file) or a usage error
(a bad option value) is printed as one line, ``festina: error: ...``, with
exit status 2 and no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from festina_hpc.cli.admin import completion, consolidate, decisions, nodes
from festina_hpc.cli.bench import bench
from festina_hpc.cli.common import AppContext
from festina_hpc.cli.config_cmd import config_group
from festina_hpc.cli.daemon import daemon
from festina_hpc.cli.db import db_group
from festina_hpc.cli.dev_cluster import dev_cluster
from festina_hpc.cli.energy import energy
from festina_hpc.cli.keys import keys
from festina_hpc.cli.models import models
from festina_hpc.cli.profiles import profiles
from festina_hpc.cli.serve import serve
from festina_hpc.cli.sim import demo, sim
from festina_hpc.cli.status import bench_status, status
from festina_hpc.config import load_config
from festina_hpc.errors import FestinaError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config file (default: $FESTINA_CONFIG, else built-in defaults).")
@click.version_option(package_name="festina-hpc")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None) -> None:
    """festina: energy-aware serving of many LLMs on shared GPUs in Slurm."""
    if config_path is None and os.environ.get("FESTINA_CONFIG"):
        config_path = Path(os.environ["FESTINA_CONFIG"])
    ctx.obj = AppContext(load_config(config_path),
                         gpu_backend_override=os.environ.get("FESTINA_GPU_BACKEND") or None)


cli.add_command(profiles)
cli.add_command(bench)
cli.add_command(config_group)
cli.add_command(sim)
cli.add_command(demo)
cli.add_command(dev_cluster)
cli.add_command(db_group)
cli.add_command(serve)
cli.add_command(daemon)
cli.add_command(energy)
cli.add_command(models)
cli.add_command(keys)
cli.add_command(status)
cli.add_command(consolidate)
cli.add_command(nodes)
cli.add_command(decisions)
cli.add_command(completion)
bench.add_command(bench_status)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="festina", standalone_mode=False)
    except FestinaError as exc:
        click.echo(f"festina: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("festina: aborted", err=True)
        return 1
    except click.UsageError as exc:
        # One line naming the option and value, like every other input error.
        click.echo(f"festina: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
