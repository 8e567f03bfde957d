"""The command line's one grammar for time (``festina_hpc/cli/params.py``): every --since/--until reads a value
as the same instant, durations combine (``1h30m``), and a bad value is click's one-line usage error naming the
option and the value."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from festina_hpc.cli import params
from festina_hpc.cli.params import DURATION, TIME, duration, parse_duration_s
from tests.cli.conftest import NOT_A_TIME, Festina

NOW = datetime(2026, 3, 8, 12, 30, tzinfo=UTC)


@pytest.fixture
def fixed_now(monkeypatch: pytest.MonkeyPatch) -> datetime:
    monkeypatch.setattr(params, "utc_now", lambda: NOW)
    return NOW


@pytest.fixture
def db_url(festina: Festina, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("FESTINA_DB_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    assert festina("db", "upgrade", "--db-url", url).code == 0
    return url


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("15m", 900.0), ("1h", 3600.0), ("2d", 172_800.0), ("1w", 604_800.0), ("250ms", 0.25),
    ("1h30m", 5400.0), ("1d2h3m4s", 93_784.0), ("1.5h", 5400.0), (" 1h 30m ", 5400.0), ("2H", 7200.0),
    ("45", 45.0), ("0.1", 0.1),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "h", "1y", "-1h", "30m1h", "1m1m", "1h30", "1..5h", "inf", "nan", "1e3s"])
def test_not_durations(text: str) -> None:
    assert parse_duration_s(text) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("1h", NOW - timedelta(hours=1)), ("90m", NOW - timedelta(minutes=90)), ("1h30m", NOW - timedelta(minutes=90)),
    ("2d", NOW - timedelta(days=2)), ("1w", NOW - timedelta(weeks=1)), ("30s", NOW - timedelta(seconds=30)),
    ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC)), ("2026-03-01T12:00", datetime(2026, 3, 1, 12, tzinfo=UTC)),
    ("2026-03-01T12:00Z", datetime(2026, 3, 1, 12, tzinfo=UTC)),
    ("2026-03-01T13:00+01:00", datetime(2026, 3, 1, 12, tzinfo=UTC)),
    ("2026-03-01 12:00:30", datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)),
])
def test_the_same_since_is_the_same_instant_for_energy_and_decisions(
        festina: Festina, db_url: str, fixed_now: datetime, text: str, expected: datetime) -> None:
    energy = festina("energy", "report", "--by", "day", "--since", text, "--format", "json", "--db-url", db_url)
    decisions = festina("decisions", "--since", text, "--json", "--db-url", db_url)
    assert (energy.code, energy.err, decisions.code, decisions.err) == (0, "", 0, "")
    assert json.loads(energy.out)["since"] == json.loads(decisions.out)["since"] == expected.isoformat()
    assert datetime.fromisoformat(json.loads(decisions.out)["since"]).utcoffset() == timedelta(0)


def test_until_reads_the_same_grammar_and_now_is_one_instant(festina: Festina, db_url: str) -> None:
    # Not fixed_now: with the real clock, --since 2h and --until 1h must still be exactly an hour apart.
    for command in (["report", "--by", "model"], ["query", "energy_by_day"]):
        result = festina("energy", *command, "--since", "2h", "--until", "1h", "--format", "json", "--db-url", db_url)
        assert (result.code, result.err) == (0, ""), result.err
        data = json.loads(result.out)
        since, until = datetime.fromisoformat(data["since"]), datetime.fromisoformat(data["until"])
        assert until - since == timedelta(hours=1)
        assert timedelta(minutes=59) < datetime.now(UTC) - until < timedelta(minutes=61)


@pytest.mark.parametrize(("argv", "option", "value"), [
    (["energy", "report", "--by", "day", "--since"], "--since", "last week"),
    (["energy", "report", "--by", "day", "--until"], "--until", "yesterday"),
    (["energy", "query", "energy_by_day", "--since"], "--since", "1h30"),
    (["energy", "plot", "--what", "node", "--out", "x.png", "--since"], "--since", "30m1h"),
    (["decisions", "--since"], "--since", "last week"),
    (["decisions", "--since"], "--since", "2026-02-30"),
    (["decisions", "--since"], "--since", "3600"),  # a bare number is a mistyped date, not seconds, for a time
])
def test_a_bad_time_is_one_usage_line_naming_option_and_value(festina: Festina, db_url: str, argv: list[str],
                                                               option: str, value: str) -> None:
    result = festina(*argv, value, "--db-url", db_url)
    assert (result.code, result.out) == (2, "")
    assert result.err == f"festina: error: Invalid value for '{option}': {value!r} {NOT_A_TIME}\n"


def test_durations_in_the_options_that_take_seconds(festina: Festina, db_url: str) -> None:
    for value, seconds in [("300", "300"), ("5m", "300"), ("1h30m", "5400"), ("0.5", "0.5")]:
        out = festina("status", "--no-slurm", "--window-s", value, "--db-url", db_url).out
        assert f"SLO window {seconds} s" in out, out
    bad = festina("status", "--no-slurm", "--window-s", "five minutes", "--db-url", db_url)
    assert bad.err == ("festina: error: Invalid value for '--window-s': 'five minutes' is not a duration "
                       "(seconds, or e.g. 90s, 15m, 1h30m, 2d)\n")
    assert festina("status", "--watch", "100ms").err == (
        "festina: error: Invalid value for '--watch': '100ms' is not a duration of at least 0.2 s\n")
    assert festina("dev-cluster", "up", "--suspend-time", "1.5s").err == (
        "festina: error: Invalid value for '--suspend-time': '1.5s' is not a whole number of seconds\n")


def test_the_types_outside_a_command() -> None:
    @click.command()
    @click.option("--since", type=TIME)
    @click.option("--until", type=TIME)
    @click.option("--for", "for_s", type=DURATION)
    @click.option("--every", type=duration(min_s=1, whole_s=True))
    def command(since: datetime, until: datetime, for_s: float, every: int) -> None:
        click.echo(f"{until - since} {for_s!r} {every!r}")

    result = CliRunner().invoke(command, ["--since", "3h", "--until", "1h1s", "--for", "2m",
                                                        "--every", "1m"])
    assert (result.exit_code, result.output) == (0, "1:59:59 120.0 60\n")
    assert "--every': '0.5' is not a duration of at least 1 s" in CliRunner().invoke(
        command, ["--every", "0.5"]).output


def test_a_future_time_counts_forward_and_refuses_the_past(fixed_now: datetime) -> None:
    assert params.FUTURE_TIME.convert("90d", None, None) == NOW + timedelta(days=90)
    assert params.FUTURE_TIME.convert("2027-01-31", None, None) == datetime(2027, 1, 31, tzinfo=UTC)
    with pytest.raises(click.BadParameter, match=r"^'2026-03-08T12:00' is not in the future \(now 2026-03-08T12:30"):
        params.FUTURE_TIME.convert("2026-03-08T12:00", None, None)
