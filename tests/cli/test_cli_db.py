"""``festina db upgrade|downgrade|current``: where the URL comes from, the migrations, one-line errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from festina_hpc.db.migrate import head_revision
from tests.cli.conftest import Festina
from tests.conftest import write_config


@pytest.fixture(autouse=True)
def _no_db_url_from_the_caller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FESTINA_DB_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the default database, never the real one


def test_upgrade_current_downgrade_round_trip(festina: Festina, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    head = head_revision()
    assert festina("db", "current", "--db-url", url).out == f"{url}: at base (no festina tables)\n"
    result = festina("db", "upgrade", "--db-url", url)
    assert (result.code, result.out, result.err) == (0, f"{url}: at {head} (head)\n", "")
    assert json.loads(festina("db", "current", "--db-url", url, "--json").out) == {
        "db_url": url, "revision": head, "head": head, "is_head": True}
    result = festina("db", "downgrade", "base", "--db-url", url)
    assert (result.code, result.out) == (0, f"{url}: at base (no festina tables)\n")
    assert festina("db", "upgrade", "--db-url", url, "--revision", head).code == 0


def test_url_from_option_then_environment_then_config_then_default(festina: Festina, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    default = f"sqlite:///{tmp_path / 'state' / 'festina' / 'festina.db'}"
    assert festina("db", "upgrade").out.startswith(f"{default}: at ")
    assert (tmp_path / "state" / "festina" / "festina.db").is_file()
    config = write_config(tmp_path / "festina.toml", f'[db]\nurl = "sqlite:///{tmp_path / "cfg.db"}"\n')
    assert festina("--config", str(config), "db", "current").out.startswith(f"sqlite:///{tmp_path / 'cfg.db'}: ")
    monkeypatch.setenv("FESTINA_DB_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert festina("--config", str(config), "db", "current").out.startswith(f"sqlite:///{tmp_path / 'env.db'}: ")
    option = f"sqlite:///{tmp_path / 'opt.db'}"
    assert festina("--config", str(config), "db", "current", "--db-url", option).out.startswith(f"{option}: ")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_database_that_does_not_answer_exits_2_with_one_line_naming_the_url(festina: Festina) -> None:
    port = _closed_port()
    result = festina("db", "upgrade", "--db-url", f"postgresql://festina:hunter2@127.0.0.1:{port}/festina")
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith(f"festina: error: database postgresql+psycopg://festina:***@127.0.0.1:{port}/festina "
                                 "does not answer: ")
    assert result.err.count("\n") == 1 and "hunter2" not in result.err


@pytest.mark.parametrize(("case", "argv", "expected"), [
    ("not a URL", ["db", "current", "--db-url", "festina.db"],
     "festina: error: --db-url: 'festina.db' is not a database URL"),
    ("unsupported backend", ["db", "current", "--db-url", "mysql://u@h/db"],
     "festina: error: --db-url: 'mysql://u@h/db' is not supported"),
    ("unknown revision", ["db", "downgrade", "nosuch"], "cannot migrate to 'nosuch': Can't locate revision"),
])
def test_bad_input_exits_2_with_one_line(festina: Festina, case: str, argv: list[str], expected: str) -> None:
    result = festina(*argv)
    assert result.code == 2, case
    assert result.err.count("\n") == 1 and expected in result.err, (case, result.err)


def test_bad_db_url_in_config_names_the_config_file(festina: Festina, tmp_path: Path) -> None:
    config = write_config(tmp_path / "festina.toml", '[db]\nurl = "oracle://x@y/z"\n')
    result = festina("--config", str(config), "db", "current")
    assert result.code == 2
    assert result.err.startswith(f"festina: error: {config} db.url: 'oracle://x@y/z' is not supported")
