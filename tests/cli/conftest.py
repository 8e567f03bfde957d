"""Running the ``festina`` command in-process, as its console script does (``main(argv)``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from festina_hpc.cli.main import main
from tests.conftest import write_config


@dataclass(frozen=True)
class Result:
    code: int  # what main() returns: the process exit status
    out: str
    err: str


Festina = Callable[..., Result]

# What every --since and --until says of a value that is neither a time nor a duration (festina_hpc/cli/params.py).
NOT_A_TIME = ("is not a time (ISO 8601, e.g. 2026-03-01 or 2026-03-01T12:00Z) or a duration back from now "
              "(e.g. 1h, 30m, 2d)")


@pytest.fixture
def festina(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Festina:
    monkeypatch.delenv("FESTINA_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal width, 80 when not a terminal

    def run(*argv: str) -> Result:
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def config_path(tmp_path: Path, profiles_dir: Path) -> Path:
    """A config whose profiles folder is the test tables."""
    return write_config(tmp_path / "festina.toml", f'[profiles]\ndir = "{profiles_dir}"\n')


def with_option(argv: Sequence[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value``: replaced where it is given, else appended."""
    changed = list(argv)
    if option in changed:
        changed[changed.index(option) + 1] = value
    else:
        changed += [option, value]
    return changed
