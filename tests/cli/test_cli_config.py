"""``festina config show`` and how every command reports a bad config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from festina_hpc.config import config_as_dict, load_config
from tests.cli.conftest import Festina
from tests.conftest import write_config


def test_config_show_prints_the_resolved_config(festina: Festina, config_path: Path, profiles_dir: Path) -> None:
    result = festina("--config", str(config_path), "config", "show")
    assert (result.code, result.err) == (0, "")
    shown = json.loads(result.out)
    assert shown == config_as_dict(load_config(config_path))
    assert shown["profiles"] == {"dir": str(profiles_dir), "out_of_range": "error"}
    assert shown["gpu"]["simulated_count"] == 2 and shown["source"] == str(config_path)


def test_config_show_without_a_file_prints_defaults(festina: Festina) -> None:
    result = festina("config", "show")
    assert result.code == 0
    assert json.loads(result.out)["source"] == "<defaults>"


def test_festina_config_variable_names_the_file(festina: Festina, config_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FESTINA_CONFIG", str(config_path))
    assert json.loads(festina("config", "show").out)["source"] == str(config_path)


@pytest.mark.parametrize(("case", "text", "expected"), [
    ("unknown key", "[gpu]\nbackends = 'nvml'\n", "unknown key gpu.backends = 'nvml'"),
    ("wrong type", "[gpu]\nsimulated_count = 'two'\n", "gpu.simulated_count must be int, got 'two'"),
    ("not a choice", "[profiles]\nout_of_range = 'wrap'\n", "profiles.out_of_range = 'wrap' is not one of"),
    ("invalid TOML", "[gpu\n", "invalid TOML"),
])
def test_bad_config_exits_2_with_one_error_line(festina: Festina, tmp_path: Path, case: str, text: str,
                                                expected: str) -> None:
    path = write_config(tmp_path / "bad.toml", text)
    result = festina("--config", str(path), "config", "show")
    assert result.code == 2, case
    assert result.out == ""
    assert result.err.startswith(f"festina: error: {path}: "), result.err
    assert result.err.count("\n") == 1 and result.err.endswith("\n"), result.err
    assert expected in result.err, (case, result.err)


def test_missing_config_file_exits_2_with_one_error_line(festina: Festina, tmp_path: Path) -> None:
    result = festina("--config", str(tmp_path / "absent.toml"), "config", "show")
    assert result.code == 2
    assert result.err == f"festina: error: {tmp_path / 'absent.toml'}: cannot read config: No such file or directory\n"
