"""API keys in the database (SQLite and PostgreSQL): only the hash is stored, lookups by hash, revocation,
canonical model names, and every bad input refused before anything is written."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from festina_hpc.db.keys import ApiKeyError, KeyRing, hash_token, looks_like_token, parse_rate
from festina_hpc.profiles.store import ProfileStore
from tests.db.conftest import T0, TickingClock
from tests.serve.conftest import store as profiles  # noqa: F401  (the shipped-profiles fixture)


@pytest.fixture
def ring(migrated: Engine, profiles: ProfileStore) -> KeyRing:  # noqa: F811
    return KeyRing(migrated, profiles, clock=TickingClock())


def test_create_find_revoke(ring: KeyRing, migrated: Engine) -> None:
    token, info = ring.create("alice", "proj1", ["Llama-3.1-8B", "mistral-7b", "llama-3.1-8b"], 2.5,
                              T0 + timedelta(days=30))
    assert looks_like_token(token) and info.prefix == token[:11]
    assert (info.models, info.rate_limit_per_s, info.state(T0)) == (("llama-3.1-8b", "mistral-7b"), 2.5, "active")
    assert info.state(T0 + timedelta(days=31)) == "expired"
    with migrated.connect() as connection:
        stored = " ".join(str(v) for row in connection.execute(text("SELECT * FROM api_keys")) for v in row)
    assert token not in stored and hash_token(token) in stored
    assert ring.find(hash_token(token)) == info
    assert ring.find(hash_token(token + "x")) is None
    other, _ = ring.create("bob", "proj2")
    assert other != token and hash_token(other) != hash_token(token)
    revoked = ring.revoke(info.prefix)
    assert revoked.revoked_at is not None and ring.revoke(str(info.id)).revoked_at == revoked.revoked_at
    assert ring.find(hash_token(token)).state(T0) == "revoked"  # type: ignore[union-attr]
    assert [k.user_name for k in ring.list(include_revoked=False)] == ["bob"]


def test_role_is_stored_and_user_by_default(ring: KeyRing, migrated: Engine) -> None:
    user_token, user = ring.create("alice", "proj1")
    admin_token, admin = ring.create("root", "ops", role="admin")
    assert (user.role, admin.role) == ("user", "admin")
    assert [k.role for k in ring.list()] == ["user", "admin"]
    assert ring.find(hash_token(admin_token)).role == "admin"  # type: ignore[union-attr]
    assert ring.find(hash_token(user_token)).to_json(T0)["role"] == "user"  # type: ignore[union-attr]
    with pytest.raises(IntegrityError), migrated.begin() as connection:  # the database refuses a role it does not know
        connection.execute(text("UPDATE api_keys SET role = 'root' WHERE id = 1"))


@pytest.mark.parametrize("args, message", [
    (("", "proj1"), "user = '' must be 1-255 characters"),
    (("alice", " proj1"), "account = ' proj1' must be 1-255 characters without surrounding spaces"),
    (("alice", "proj1", ["gpt-9"]), "models = 'gpt-9' is not a known model"),
    (("alice", "proj1", [], 0.0), "rate_limit = 0.0 must be a positive number per second"),
    (("alice", "proj1", [], None, T0 - timedelta(seconds=1)), "expires = 2026-03-01T11:59:59+00:00 is not in the "
                                                               "future"),
    (("alice", "proj1", [], None, None, "root"), "role = 'root' is not one of user, admin"),
])
def test_bad_keys_are_refused_and_nothing_is_stored(ring: KeyRing, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ApiKeyError, match=f"^{re.escape(message)}"):
        ring.create(*args)
    assert ring.list() == []


@pytest.mark.parametrize("value, per_s", [("5/s", 5.0), ("120/min", 2.0), ("0.5", 0.5), ("3600/h", 1.0),
                                          (" 10 / second ", 10.0), ("1e3/s", 1000.0)])
def test_parse_rate(value: str, per_s: float) -> None:
    assert parse_rate(value) == pytest.approx(per_s)
