"""Who sent a gateway request, and whether it may be served: API keys, rate limits, energy quotas.

``Authenticator.authenticate`` turns the ``Authorization: Bearer fk_...`` header into a ``Tenant``
(user and Slurm account, the attribution every request record carries): no key where keys are
required, a malformed, unknown, revoked or expired key are all 401. Where keys are optional (a
lab cluster that runs open) a request without a key is served as the configured default tenant,
and so is one whose bearer value is not a festina key at all (``unused``: OpenAI clients must send
something); a request with a bad festina key (``fk_...``) is still 401: a wrong key is a mistake
to report, not a reason to serve someone as anonymous. ``admit`` then checks the model (403 when the key does not allow
it), the account's energy quota and the key's rate (429 with Retry-After).

Keys are looked up by hash through a ``KeyLookup`` (the database's ``KeyRing``) and cached in
memory for ``key_cache_ttl_s``, answers "no such key" included, so the database is not asked per
request. A revocation therefore takes effect within that TTL (expiry is checked per request
against the cached expiry, so it is exact). The rate limit is a token bucket per key, in memory
(one festinad serves the gateway): it holds one second's worth of requests, at least one, and
refills at the key's rate, so a client may burst that much and then gets 429 with the seconds
until the next request would be admitted.

Quotas: ``account_energy_quota_j_per_day`` gives accounts a daily budget of GPU energy (J, per
UTC day, as ``festina energy report --by account`` charges it; see ``db/queries/energy_by_account.sql``,
the tenant report's split summed per account). That report
splits the live attribution festina-node stores (each GPU interval among its instances by SM
share, ``node/db_sink.py``) over the accounts whose requests each instance served, by tokens, and
charges an hour without requests to the instance's Slurm job account. It is the gateway's account
that a quota names, not the Slurm account of the serving job (``account_energy_daily``): festinad
runs shared instances under its own account, so that rollup would charge no tenant at all. The
usage is read through an ``EnergyUsage`` at most every ``quota_refresh_s``, so it lags the GPUs by
that, by the node's tick and by the energy ingest. Over its quota an account's requests are refused (``over_quota =
"refuse"``: 429, Retry-After until the next UTC day) or served at low priority (``"deprioritize"``:
the gateway routes them only while no normal-priority request waits for an instance; see
``festina_hpc.daemon.gateway``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import IntEnum
from typing import Protocol

from sqlalchemy import Engine

from festina_hpc.db.keys import PREFIX_CHARS, TOKEN_PREFIX, KeyInfo, hash_token, looks_like_token, new_token
from festina_hpc.errors import FestinaError
from festina_hpc.serve import openai

log = logging.getLogger(__name__)

OVER_QUOTA = ("refuse", "deprioritize")
_CACHE_MAX = 100_000  # cached lookups at most; past that the cache starts over (bounds memory under a key scan)


@dataclass(frozen=True)
class Tenant:
    """Who a request is attributed to."""

    user_name: str
    account: str
    key_id: int | None = None  # None: a keyless request on an open gateway
    models: frozenset[str] = frozenset()  # canonical names the key allows; empty: every model
    rate_limit_per_s: float | None = None
    expires_unix_s: float | None = None
    role: str = "user"  # "admin": may also call festinad's /admin/* (checked there only, not per /v1 request)

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


class Priority(IntEnum):
    NORMAL = 0
    LOW = 1  # over its account's quota under over_quota = "deprioritize"


@dataclass(frozen=True)
class AuthConfig:
    """``[gateway]`` of the config, as the gateway uses it."""

    require_keys: bool = True
    default_user: str = ""  # keyless requests on an open gateway are attributed to these
    default_account: str = ""
    key_cache_ttl_s: float = 10.0  # a revoked key may still be served this long
    account_energy_quota_j_per_day: Mapping[str, float] = field(default_factory=dict)
    over_quota: str = "refuse"  # or "deprioritize"
    quota_refresh_s: float = 60.0  # usage is re-read at most this often


class KeyLookup(Protocol):
    def find(self, key_hash: str) -> KeyInfo | None:
        """The key with this hash, revoked or not; None when there is none. May block (a database)."""
        ...


class EnergyUsage(Protocol):
    def energy_by_account_j(self, since: datetime) -> Mapping[str, float]:
        """GPU energy charged to each account since ``since``. May block (a database)."""
        ...


class MemoryKeys:
    """Keys held in memory (tests, the benchmark): ``add`` returns the token."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyInfo] = {}

    def add(self, user_name: str, account: str, models: tuple[str, ...] = (), rate_limit_per_s: float | None = None,
            expires_at: datetime | None = None, token: str | None = None, role: str = "user") -> str:
        token = token or new_token()
        self.keys[hash_token(token)] = KeyInfo(len(self.keys) + 1, token[:PREFIX_CHARS], user_name, account, models,
                                               rate_limit_per_s, datetime.now(UTC), expires_at, None, role)
        return token

    def revoke(self, token: str) -> None:
        key_hash = hash_token(token)
        self.keys[key_hash] = replace(self.keys[key_hash], revoked_at=datetime.now(UTC))

    def find(self, key_hash: str) -> KeyInfo | None:
        return self.keys.get(key_hash)


class DbEnergyUsage:
    """``EnergyUsage`` over the account report (``energy_by_account``, ``festina energy report --by account``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def energy_by_account_j(self, since: datetime) -> Mapping[str, float]:
        from festina_hpc.db.accounting import run_query

        rows = run_query(self.engine, "energy_by_account", since=since).as_dicts()
        return {row["account"]: float(row["energy_j"] or 0.0) for row in rows}


class TokenBucket:
    """A request rate limit: ``capacity`` requests at once, refilled at ``rate_per_s``."""

    def __init__(self, rate_per_s: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s)  # one second's worth, at least one request
        self.tokens = self.capacity
        self.updated_s = now_s

    def take(self, now_s: float) -> float:
        """0 when a request may go now (and counts it); else the seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


def _unauthorized(message: str) -> openai.ApiError:
    return openai.ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _tenant(info: KeyInfo) -> Tenant:
    return Tenant(info.user_name, info.account, info.id, frozenset(info.models), info.rate_limit_per_s,
                  info.expires_at.timestamp() if info.expires_at is not None else None, info.role)


class Authenticator:
    """See the module docstring. ``clock`` is monotonic (cache, buckets); ``wall_clock`` is Unix time."""

    def __init__(self, keys: KeyLookup, config: AuthConfig = AuthConfig(), usage: EnergyUsage | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        if config.over_quota not in OVER_QUOTA:
            raise ValueError(f"over_quota = {config.over_quota!r} is not one of {', '.join(OVER_QUOTA)}")
        if config.account_energy_quota_j_per_day and usage is None:
            raise ValueError("account_energy_quota_j_per_day needs an EnergyUsage to read the accounts' energy")
        self.keys = keys
        self.config = config
        self.usage = usage
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[str, tuple[float, Tenant | None, bool]] = {}  # hash -> (read at, tenant, revoked)
        self._buckets: dict[int, TokenBucket] = {}
        self._used_j: Mapping[str, float] = {}
        self._used_day: int | None = None  # the UTC day _used_j counts
        self._used_read_s = -math.inf
        self._reading = False  # a usage read is in flight
        self._default = Tenant(config.default_user, config.default_account)

    async def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of a request's ``Authorization`` header, or a 401 ``ApiError``."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        # OpenAI clients must send some key ("unused", "EMPTY"): on an open gateway a bearer value that
        # does not claim to be a festina key counts as none. One that does (fk_...) must be valid.
        if authorization is None or (not self.config.require_keys and scheme.lower() == "bearer"
                                     and not token.startswith(TOKEN_PREFIX)):
            if self.config.require_keys:
                raise _unauthorized("this gateway needs an API key: send 'Authorization: Bearer fk_...' "
                                    "(`festina keys create` issues one)")
            return self._default
        if scheme.lower() != "bearer" or not looks_like_token(token):
            raise _unauthorized("the Authorization header is not 'Bearer fk_...' with a festina API key")
        key_hash = hash_token(token)
        now_s = self._clock()
        cached = self._cache.get(key_hash)
        if cached is None or now_s - cached[0] >= self.config.key_cache_ttl_s:
            try:
                info = await asyncio.to_thread(self.keys.find, key_hash)
            except FestinaError as exc:  # fail closed: no key is served unchecked
                log.error("cannot look up API key %s...: %s", token[:PREFIX_CHARS], exc)
                raise openai.ApiError(503, "cannot check the API key now; try again", error_type="service_unavailable",
                                      headers={"Retry-After": "5"}) from None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            cached = (now_s, _tenant(info) if info is not None else None,
                      info is not None and info.revoked_at is not None)
            self._cache[key_hash] = cached
        _, tenant, revoked = cached
        if tenant is None:
            raise _unauthorized(f"API key {token[:PREFIX_CHARS]}... is not a key of this gateway")
        if revoked:
            raise _unauthorized(f"API key {token[:PREFIX_CHARS]}... was revoked")
        if tenant.expires_unix_s is not None and self._wall() >= tenant.expires_unix_s:
            raise _unauthorized(f"API key {token[:PREFIX_CHARS]}... expired")
        return tenant

    async def admit(self, tenant: Tenant, model: str) -> Priority:
        """Whether ``tenant`` may call ``model`` now: its priority, or a 403/429 ``ApiError``."""
        if not tenant.allows(model):
            raise openai.ApiError(403, f"API key of {tenant.user_name}/{tenant.account} does not allow model "
                                       f"{model!r} (allowed: {', '.join(sorted(tenant.models))})",
                                  param="model", error_type="permission_error", code="model_not_allowed")
        priority = await self._quota(tenant)
        if tenant.key_id is not None and tenant.rate_limit_per_s is not None:
            now_s = self._clock()
            bucket = self._buckets.get(tenant.key_id)
            if bucket is None or bucket.rate_per_s != tenant.rate_limit_per_s:
                bucket = self._buckets[tenant.key_id] = TokenBucket(tenant.rate_limit_per_s, now_s)
            wait_s = bucket.take(now_s)
            if wait_s > 0:
                raise openai.ApiError(429, f"rate limit of {tenant.rate_limit_per_s:g} requests/s exceeded for "
                                           f"{tenant.user_name}/{tenant.account}", error_type="rate_limit_error",
                                      code="rate_limit_exceeded", headers={"Retry-After": str(math.ceil(wait_s))})
        return priority

    async def _quota(self, tenant: Tenant) -> Priority:
        quota_j = self.config.account_energy_quota_j_per_day.get(tenant.account)
        if quota_j is None:
            return Priority.NORMAL
        assert self.usage is not None
        wall_s = self._wall()
        day = int(wall_s // 86_400)
        now_s = self._clock()
        stale = day != self._used_day or now_s - self._used_read_s >= self.config.quota_refresh_s
        if stale and not self._reading:
            # One read at a time: requests that arrive meanwhile use the figures before it.
            self._reading = True
            since = datetime.fromtimestamp(day * 86_400, UTC)
            try:
                self._used_j = await asyncio.to_thread(self.usage.energy_by_account_j, since)
                self._used_day = day
            except Exception:  # an unreadable usage must not stop the gateway: the last figures stand
                log.exception("could not read the accounts' energy for quotas")
            finally:
                self._used_read_s = now_s  # after a failure too: retried a period later, not per request
                self._reading = False
        used_j = self._used_j.get(tenant.account, 0.0) if self._used_day == day else 0.0
        if used_j < quota_j:
            return Priority.NORMAL
        if self.config.over_quota == "deprioritize":
            return Priority.LOW
        next_day_s = (day + 1) * 86_400
        raise openai.ApiError(429, f"account {tenant.account!r} used {used_j:.0f} J of GPU energy today, over its "
                                   f"quota of {quota_j:.0f} J per day; its requests are refused until "
                                   f"{datetime.fromtimestamp(next_day_s, UTC).isoformat()}",
                              error_type="rate_limit_error", code="energy_quota_exceeded",
                              headers={"Retry-After": str(max(1, math.ceil(next_day_s - wall_s)))})
