"""Gateway API keys: issued per user and Slurm account, stored as a hash, looked up by the gateway.

A key is a bearer token ``fk_<43 random URL-safe characters>`` (256 bits from ``secrets``), shown
once when ``festina keys create`` makes it. The database keeps its SHA-256 and a short prefix to
recognise it in ``festina keys list``, never the token: a stolen table cannot be replayed. A plain
hash suffices, where passwords would need a slow KDF (bcrypt, argon2), because the token is 256
random bits, not a guessable word: nobody can search that space, however fast each guess is; and
one fast hash keeps the lookup an index probe on ``key_hash``.

A key may name the models it can call (canonical profile names; none: every model), a request
rate and an expiry, and has a role: ``user`` (the gateway's ``/v1/*``) or ``admin`` (also
festinad's ``/admin/*``: consolidation, draining models, node control). Revoking sets
``revoked_at`` (keys are never deleted, so request rows keep naming who sent them). ``KeyRing``
validates every input first and names the field and value in an ``ApiKeyError`` before anything
is written.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from festina_hpc.db.engine import Transactions
from festina_hpc.db.models import ApiKey, CatalogueModel
from festina_hpc.db.store import utc_now
from festina_hpc.errors import FestinaError, UnknownProfileError
from festina_hpc.profiles.store import ProfileStore

TOKEN_PREFIX = "fk_"
PREFIX_CHARS = 11  # "fk_" and 8 random characters: enough to tell keys apart, far too few to guess the rest
_TOKEN = re.compile(r"fk_[A-Za-z0-9_-]{43}")
_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*(s|sec|second|min|minute|h|hour))?\s*")
_PER_S = {None: 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "min": 1 / 60, "minute": 1 / 60, "h": 1 / 3600,
          "hour": 1 / 3600}
ROLES = ("user", "admin")


class ApiKeyError(FestinaError):
    """A key refused or not found; the message names the field and the value."""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: SHA-256, hex (see the module docstring for why no slow KDF)."""
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    """Whether ``token`` has a key's shape (anything else is refused without a lookup)."""
    return _TOKEN.fullmatch(token) is not None


@dataclass(frozen=True)
class KeyInfo:
    """A stored key, without its token."""

    id: int
    prefix: str
    user_name: str
    account: str
    models: tuple[str, ...]  # canonical names it may call; () = every model
    rate_limit_per_s: float | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    role: str = "user"  # one of ROLES

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        return {"id": self.id, "prefix": self.prefix, "user": self.user_name, "account": self.account,
                "models": list(self.models), "rate_limit_per_s": self.rate_limit_per_s,
                "created_at": iso(self.created_at), "expires_at": iso(self.expires_at),
                "revoked_at": iso(self.revoked_at), "role": self.role, "state": self.state(now)}


def parse_rate(value: str) -> float:
    """``--rate-limit``: ``R/s``, ``R/min``, ``R/h`` or a bare number (per second); positive."""
    match = _RATE.fullmatch(value)
    rate = float(match.group(1)) * _PER_S[match.group(2)] if match else 0.0
    if not match or rate <= 0:
        raise ApiKeyError(f"rate_limit = {value!r} is not a positive rate (e.g. 5/s, 120/min or 0.5)")
    return rate


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.prefix, row.user_name, row.account, tuple(m for m in row.models.split(",") if m),
                   row.rate_limit_per_s, row.created_at, row.expires_at, row.revoked_at, row.role)


def _check_name(field: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or len(value) > 255 or value != value.strip():
        raise ApiKeyError(f"{field} = {value!r} must be 1-255 characters without surrounding spaces")


class KeyRing:
    """The keys in one database; ``profiles`` resolves the model names a key is limited to."""

    def __init__(self, engine: Engine, profiles: ProfileStore | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self.profiles = profiles
        self._clock = clock
        self._transaction = Transactions(engine)

    def create(self, user_name: str, account: str, models: Sequence[str] = (), rate_limit_per_s: float | None = None,
               expires_at: datetime | None = None, role: str = "user") -> tuple[str, KeyInfo]:
        """A new key: (its token, to show once; what is stored)."""
        _check_name("user", user_name)
        _check_name("account", account)
        if role not in ROLES:
            raise ApiKeyError(f"role = {role!r} is not one of {', '.join(ROLES)}")
        if rate_limit_per_s is not None and not (isinstance(rate_limit_per_s, int | float)
                                                 and 0 < rate_limit_per_s < float("inf")):
            raise ApiKeyError(f"rate_limit = {rate_limit_per_s!r} must be a positive number per second")
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise ApiKeyError(f"expires = {expires_at.isoformat()} is not in the future")
        with self._transaction("keys create") as session:
            canonical = self._canonical_models(session, models)
            token = new_token()
            row = ApiKey(key_hash=hash_token(token), prefix=token[:PREFIX_CHARS], user_name=user_name,
                         account=account, models=",".join(canonical), rate_limit_per_s=rate_limit_per_s,
                         created_at=now, expires_at=expires_at, revoked_at=None, role=role)
            session.add(row)
            session.flush()
            return token, _info(row)

    def _canonical_models(self, session: Session, names: Sequence[str]) -> list[str]:
        """The gateway names (profile canonical) of catalogue names, profile names or their aliases."""
        catalogue = {name: profile for name, profile in
                     session.execute(select(CatalogueModel.name, CatalogueModel.profile))}
        canonical: list[str] = []
        for name in names:
            if name in catalogue:
                resolved = catalogue[name]
            else:
                try:
                    if self.profiles is None:
                        raise UnknownProfileError(name)
                    resolved = self.profiles.model(name).name
                except UnknownProfileError:
                    known = ", ".join(sorted(catalogue)) or "none"
                    raise ApiKeyError(f"models = {name!r} is not a known model: neither catalogued ({known}) nor a "
                                      "profile model (`festina profiles list`)") from None
            if resolved not in canonical:
                canonical.append(resolved)
        return canonical

    def list(self, *, include_revoked: bool = True) -> list[KeyInfo]:
        with self._transaction("keys list") as session:
            query = select(ApiKey).order_by(ApiKey.id)
            if not include_revoked:
                query = query.where(ApiKey.revoked_at.is_(None))
            return [_info(row) for row in session.scalars(query)]

    def revoke(self, which: str) -> KeyInfo:
        """Revoke the key with this id or prefix; revoking a revoked key changes nothing."""
        with self._transaction("keys revoke") as session:
            condition = ApiKey.prefix == which
            if which.isdigit():
                condition = or_(condition, ApiKey.id == int(which))
            rows = list(session.scalars(select(ApiKey).where(condition)))
            if len(rows) != 1:
                what = "matches no key" if not rows else f"matches {len(rows)} keys; give the id"
                raise ApiKeyError(f"key = {which!r} {what} (see `festina keys list`)")
            row = rows[0]
            if row.revoked_at is None:
                row.revoked_at = self._clock()
            return _info(row)

    def find(self, key_hash: str) -> KeyInfo | None:
        """The key with this hash, revoked or not (the gateway decides); None when there is none."""
        with self._transaction("keys lookup") as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()
            return _info(row) if row is not None else None
