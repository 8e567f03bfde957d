"""``festina status`` and ``festina bench status`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Festina


def test_status_json_and_text_on_an_empty_database(festina: Festina, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert festina("db", "upgrade", "--db-url", url).code == 0
    data = json.loads(festina("status", "--no-slurm", "--json", "--db-url", url).out)
    assert data["gpus"] == 0 and data["nodes"] == [] and data["source"] == "database"
    assert "(no requests in the window)" in festina("status", "--no-slurm", "--db-url", url).out


def test_status_bad_window_names_the_option(festina: Festina) -> None:
    result = festina("status", "--window-s", "0")
    assert result.code == 2 and "--window-s" in result.err


def test_bench_status_json(festina: Festina) -> None:
    result = festina("bench", "status", "--gpus", "32", "--json")
    data = json.loads(result.out)
    assert data["gpus"] == 32 and data["render_s"] > 0
