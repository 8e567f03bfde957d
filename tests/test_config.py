"""festina_hpc.config: defaults, validation and one-line errors."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from festina_hpc.config import (
    Config,
    DbConfig,
    GpuConfig,
    ProfilesConfig,
    _build_section,
    config_as_dict,
    config_from_mapping,
    load_config,
)
from festina_hpc.errors import ConfigError
from tests.conftest import write_config


def test_no_file_gives_documented_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.profiles == ProfilesConfig(dir="", out_of_range="error")
    assert config.gpu == GpuConfig(backend="auto", simulated_type="h100-sxm-80gb", simulated_count=2)
    assert (config.profiles.resolved_dir() / "gpus.toml").is_file()


def test_empty_file_gives_defaults_and_records_its_source(tmp_path: Path) -> None:
    path = write_config(tmp_path / "festina.toml", "")
    config = load_config(path)
    assert config.profiles == ProfilesConfig() and config.gpu == GpuConfig()
    assert config.source == str(path)


def test_values_in_file_override_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path / "festina.toml", '[profiles]\ndir = "/x/profiles"\nout_of_range = "clamp"\n'
                                                   '[gpu]\nbackend = "simulated"\nsimulated_count = 4\n')
    config = load_config(path)
    assert config.profiles == ProfilesConfig(dir="/x/profiles", out_of_range="clamp")
    assert config.profiles.resolved_dir() == Path("/x/profiles")
    assert config.gpu == GpuConfig(backend="simulated", simulated_count=4)


@pytest.mark.parametrize(("case", "text", "expected"), [
    ("unknown section", "[slurm]\npartition = 'gpu'\n", ["[slurm]"]),
    ("unknown key", "[gpu]\nbackends = 'nvml'\n", ["gpu.backends", "'nvml'"]),
    ("section not a table", "gpu = 3\n", ["[gpu]", "3"]),
    ("str where int expected", "[gpu]\nsimulated_count = 'two'\n", ["gpu.simulated_count", "'two'"]),
    ("float where int expected", "[gpu]\nsimulated_count = 2.0\n", ["gpu.simulated_count", "2.0"]),
    ("bool where int expected", "[gpu]\nsimulated_count = true\n", ["gpu.simulated_count", "True"]),
    ("int where str expected", "[profiles]\ndir = 5\n", ["profiles.dir", "5"]),
    ("backend not a choice", "[gpu]\nbackend = 'cuda'\n", ["gpu.backend", "'cuda'", "nvml"]),
    ("out_of_range not a choice", "[profiles]\nout_of_range = 'wrap'\n", ["profiles.out_of_range", "'wrap'"]),
    ("multi-line value", '[profiles]\nout_of_range = """clamp\nplease"""\n', ["profiles.out_of_range", "please"]),
    ("zero count", "[gpu]\nsimulated_count = 0\n", ["gpu.simulated_count", "0", "positive"]),
    ("negative count", "[gpu]\nsimulated_count = -3\n", ["gpu.simulated_count", "-3", "positive"]),
    ("invalid TOML", "[gpu\nbackend = 'nvml'\n", ["invalid TOML", "line 1"]),
    ("negative sample retention", "[db]\nsample_retention_days = -1\n",
     ["db.sample_retention_days", "-1", "must not be negative"]),
    ("sample retention not an int", "[db]\nsample_retention_days = '30d'\n", ["db.sample_retention_days", "'30d'"]),
    ("metrics_listen without a port", "[daemon]\nmetrics_listen = '127.0.0.1'\n",
     ["daemon.metrics_listen", "'127.0.0.1'", "HOST:PORT"]),
    ("metrics_listen port 0", "[daemon]\nmetrics_listen = '127.0.0.1:0'\n", ["daemon.metrics_listen", "'127.0.0.1:0'"]),
    ("metrics_listen IPv6 unbracketed", "[daemon]\nmetrics_listen = '::1:9464'\n",
     ["daemon.metrics_listen", "'::1:9464'"]),
    ("admin_open not a bool", "[daemon]\nadmin_open = 'yes'\n", ["daemon.admin_open", "'yes'"]),
])
def test_invalid_config_is_one_line_error_naming_file_key_and_value(
        tmp_path: Path, case: str, text: str, expected: list[str]) -> None:
    path = write_config(tmp_path / "festina.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, case
    assert message.startswith(f"{path}: "), case
    for fragment in expected:
        assert fragment in message, (case, fragment, message)


@pytest.mark.parametrize(("case", "make_path"), [
    ("missing file", lambda tmp: tmp / "absent.toml"),
    ("a directory", lambda tmp: tmp),
])
def test_unreadable_config_is_one_line_error_naming_file(tmp_path: Path, case: str,
                                                         make_path: Callable[[Path], Path]) -> None:
    path = make_path(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: cannot read config"), case


@dataclass(frozen=True)
class _Tuning:
    factor: float = 1.5
    count: int = 1


@pytest.mark.parametrize(("case", "raw", "expected"), [
    ("int where float expected", {"factor": 3}, _Tuning(factor=3.0)),
    ("float where float expected", {"factor": 0.25}, _Tuning(factor=0.25)),
    ("int where int expected", {"count": 7}, _Tuning(count=7)),
])
def test_ints_are_accepted_where_a_float_is_expected(case: str, raw: dict, expected: _Tuning) -> None:
    built = _build_section("<test>", "tuning", _Tuning, raw)
    assert built == expected, case
    assert type(built.factor) is float


@pytest.mark.parametrize(("case", "raw", "key"), [
    ("bool where float expected", {"factor": True}, "tuning.factor"),
    ("str where float expected", {"factor": "1.5"}, "tuning.factor"),
    ("float where int expected", {"count": 1.0}, "tuning.count"),
])
def test_floats_are_not_accepted_as_ints_nor_bools_as_numbers(case: str, raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _build_section("<test>", "tuning", _Tuning, raw)


def test_config_from_mapping_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^<mapping>: unknown section \[nosuch\]"):
        config_from_mapping({"nosuch": {}})
    assert config_from_mapping({"gpu": {"backend": "nvml"}}, source="inline").source == "inline"


def test_example_config_documents_every_key_with_its_default() -> None:
    example = Path(__file__).resolve().parent.parent / "festina.example.toml"
    loaded = config_as_dict(load_config(example))
    defaults = config_as_dict(Config())
    for d in (loaded, defaults):
        d.pop("source"), d.pop("slo")  # no SLO override by default; the example shows one commented out
    assert loaded == defaults
    written = tomllib.loads(example.read_text(encoding="utf-8"))
    assert {s: set(keys) for s, keys in written.items()} == {s: set(keys) for s, keys in defaults.items()}


@pytest.mark.parametrize(("value", "address"), [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)),
                                                ("head-admin:9100", ("head-admin", 9100)), ("", None)])
def test_metrics_listen(value: str, address: tuple[str, int] | None) -> None:
    config = config_from_mapping({"daemon": {"metrics_listen": value}})
    assert config.daemon.metrics_address() == address
    assert Config().daemon.metrics_address() == ("127.0.0.1", 9464)  # on, on loopback, by default


def test_db_url_defaults_to_a_sqlite_file_in_the_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert load_config(None).db == DbConfig(url="")
    assert DbConfig().resolved_url() == f"sqlite:///{tmp_path / 'state' / 'festina' / 'festina.db'}"
    path = write_config(tmp_path / "festina.toml", '[db]\nurl = "postgresql+psycopg://festina@db/festina"\n')
    assert load_config(path).db.resolved_url() == "postgresql+psycopg://festina@db/festina"
    with pytest.raises(ConfigError, match=r"db\.url must be str, got 5"):
        load_config(write_config(tmp_path / "bad.toml", "[db]\nurl = 5\n"))


def test_node_control_ports_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "festina.toml"
    path.write_text('[node_control]\nport = 28000\n[node_control.ports]\nn1 = 28001\nn2 = 28002\n')
    cfg = load_config(path)
    assert (cfg.node_control.port, dict(cfg.node_control.ports)) == (28000, {"n1": 28001, "n2": 28002})
    path.write_text('[node_control.ports]\nn1 = 70000\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f'{path}: node_control.ports."n1" = 70000 must be a port in 1..65535'
