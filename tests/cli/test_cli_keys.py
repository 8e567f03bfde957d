"""``festina keys``: issue, list and revoke gateway keys; the token is shown once and only its hash is stored;
every bad ``create`` input is one line naming the field and value, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from festina_hpc.db.keys import KeyRing, hash_token, looks_like_token
from festina_hpc.db.models import ApiKey
from tests.cli.conftest import Festina, with_option

CREATE = ("keys", "create", "--user", "alice", "--account", "proj1")


@pytest.fixture
def db(tmp_path: Path, festina: Festina, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'festina.db'}"
    monkeypatch.setenv("FESTINA_DB_URL", url)
    assert festina("db", "upgrade").code == 0
    return url


def test_create_list_revoke(festina: Festina, db: str) -> None:
    assert festina("models", "add", "llama8b", "--profile", "llama-3.1-8b", "--gpu-type", "h100", "--engine",
                   "vllm", "--ttft-slo-s", "1", "--tbt-slo-s", "0.1").code == 0
    created = festina(*CREATE, "--models", "llama-3.1-8b,Mistral-7B-Instruct-v0.3,llama8b", "--rate-limit", "120/min",
                      "--expires", "30d")
    assert created.code == 0, created.err
    token = created.out.strip()
    assert looks_like_token(token)  # stdout is the token alone, for scripts
    assert "cannot be shown again" in created.err
    engine = create_engine(db)
    with engine.connect() as connection:
        stored = connection.execute(select(ApiKey.key_hash, ApiKey.prefix, ApiKey.models)).one()
    assert stored == (hash_token(token), token[:11], "llama-3.1-8b,mistral-7b")  # canonical names, no token
    assert KeyRing(engine).find(hash_token(token)) is not None

    second = json.loads(festina(*CREATE[:3], "bob", "--account", "proj2", "--json").out)
    assert second["models"] == [] and second["rate_limit_per_s"] is None and looks_like_token(second["token"])
    listed = json.loads(festina("keys", "list", "--json").out)["keys"]
    assert [(k["id"], k["user"], k["account"], k["state"]) for k in listed] == [
        (1, "alice", "proj1", "active"), (2, "bob", "proj2", "active")]
    assert listed[0]["rate_limit_per_s"] == pytest.approx(2.0) and "token" not in listed[0]
    table = festina("keys", "list").out
    assert token[:11] in table and token not in table

    assert festina("keys", "revoke", token[:11]).out.startswith("revoked key 1")
    assert festina("keys", "revoke", "2").out.startswith("revoked key 2")
    assert [k["state"] for k in json.loads(festina("keys", "list", "--json").out)["keys"]] == ["revoked"] * 2
    assert "no keys" in festina("keys", "list", "--active").out
    missing = festina("keys", "revoke", "fk_nothing")
    assert (missing.code, missing.err) == (2, "festina: error: key = 'fk_nothing' matches no key "
                                              "(see `festina keys list`)\n")


def test_create_admin_key(festina: Festina, db: str) -> None:
    created = festina(*CREATE, "--role", "admin")
    assert created.code == 0, created.err
    token = created.out.strip()
    assert looks_like_token(token) and created.err.startswith("admin key 1 ")
    assert KeyRing(create_engine(db)).find(hash_token(token)).role == "admin"  # type: ignore[union-attr]
    user = json.loads(festina(*CREATE[:3], "bob", "--account", "proj2", "--json").out)
    assert user["role"] == "user"  # the default
    assert [k["role"] for k in json.loads(festina("keys", "list", "--json").out)["keys"]] == ["admin", "user"]
    table = festina("keys", "list").out.splitlines()
    assert "ROLE" in table[0] and " admin " in table[1] and " user " in table[2]
    bad = festina(*CREATE, "--role", "root")
    assert bad.code == 2 and "'root' is not one of 'user', 'admin'" in bad.err


@pytest.mark.parametrize("option, value, message", [
    ("--rate-limit", "fast", "rate_limit = 'fast' is not a positive rate (e.g. 5/s, 120/min or 0.5)"),
    ("--rate-limit", "0/s", "rate_limit = '0/s' is not a positive rate"),
    ("--rate-limit", "-3", "rate_limit = '-3' is not a positive rate"),
    ("--rate-limit", "5/fortnight", "rate_limit = '5/fortnight' is not a positive rate"),
    ("--models", "gpt-9", "models = 'gpt-9' is not a known model"),
    ("--models", "llama-3.1-8b,gpt-9", "models = 'gpt-9' is not a known model"),
    ("--expires", "2020-01-01", "Invalid value for '--expires': '2020-01-01' is not in the future (now "),
    ("--expires", "tomorrow", "Invalid value for '--expires': 'tomorrow' is not a time (ISO 8601, e.g. 2026-03-01 "
                              "or 2026-03-01T12:00Z) or a duration from now (e.g. 90d, 12h, 2w)"),
    ("--user", " ", "user = ' ' must be 1-255 characters without surrounding spaces"),
    ("--account", "", "account = '' must be 1-255 characters"),
])
def test_bad_create_input(festina: Festina, db: str, option: str, value: str, message: str) -> None:
    argv = with_option(CREATE, option, value)
    result = festina(*argv)
    assert result.code == 2
    assert result.err.startswith(f"festina: error: {message}") and result.err.count("\n") == 1, result.err
    assert result.out == ""
    assert json.loads(festina("keys", "list", "--json").out)["keys"] == []  # nothing stored
