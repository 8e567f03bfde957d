"""What every command shares: the application context and common options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import click

from festina_hpc.config import Config
from festina_hpc.profiles.store import ProfileStore


@dataclass
class AppContext:
    """Built once in ``main()``; commands ask it for the pieces they need."""

    config: Config
    # FESTINA_GPU_BACKEND, read by main(): overrides the config's gpu.backend.
    gpu_backend_override: str | None = None
    _store: ProfileStore | None = field(default=None, repr=False)

    def profile_store(self) -> ProfileStore:
        if self._store is None:
            self._store = self.config.profiles.open_store()
        return self._store


pass_app = click.make_pass_decorator(AppContext)

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))
