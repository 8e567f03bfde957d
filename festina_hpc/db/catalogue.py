"""The model catalogue: which models festinad serves, on which profile and engine, with which SLOs.

``festina models add|list|show|update|remove`` are thin over ``Catalogue``; festinad reads
``Catalogue.list()`` at start to know its models and their SLOs. Every entry is validated
before anything is written (``validate_entry``): a bad value is a ``CatalogueError`` naming
the field and the value, and a model with no shipped profile on its GPU type is refused with
the list of the profiles that are shipped there. Each call is one transaction.

An entry's ``profile`` is the profile model festinad's instances run (and the name
instances are recorded under), so a profile is catalogued at most once per GPU type; the
entry's ``name`` is what clients send, served as an alias of the profile model.
"""

from __future__ import annotations

import builtins
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from festina_hpc.db.engine import Transactions
from festina_hpc.db.models import CatalogueModel, ModelInstance
from festina_hpc.db.store import utc_now
from festina_hpc.errors import FestinaError, UnknownProfileError
from festina_hpc.policy.types import InstancePhase
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.launch import EMULATED_ENGINE_FLAGS, EngineArgsError, split_engine_args, unknown_emulated_args

ENGINES = ("vllm", "emulated")
_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]+")  # a Slurm account name, as it goes on an #SBATCH line
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/:")


class CatalogueError(FestinaError):
    """A catalogue entry refused (bad field, unknown model or profile, instances still running)."""


@dataclass(frozen=True)
class CatalogueEntry:
    """One served model. ``profile`` and ``gpu_type`` are canonical profile names once stored."""

    name: str
    profile: str
    gpu_type: str
    engine: str
    ttft_slo_s: float
    tbt_slo_s: float
    engine_args: str = ""
    min_instances: int = 0
    max_instances: int | None = None  # None: no bound
    keep_alive_s: float | None = None  # None: festinad's default ([daemon] keep_alive_s)
    account: str = ""  # Slurm account of its serving jobs; "" = the submitter's default
    max_output_tokens: int | None = None  # largest max_tokens a request may ask; None: the context length

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ENTRY_FIELDS = tuple(f.name for f in fields(CatalogueEntry))


def _bad(name: str, field: str, value: Any, what: str) -> CatalogueError:
    return CatalogueError(f"model {name!r}: {field} = {value!r} {what}")


def _number(name: str, field: str, value: Any, *, positive: bool, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, field, value, "is not a finite number")
    if value < 0 or (positive and value == 0):
        raise _bad(name, field, value, "must be positive" if positive else "must be non-negative")


def _integer(name: str, field: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, field, value, "is not an integer")
    if value < 0:
        raise _bad(name, field, value, "must be non-negative")


def shipped_profiles(profiles: ProfileStore, gpu_type: str) -> list[str]:
    """Profile models with a shipped table on ``gpu_type`` (canonical names, sorted)."""
    return sorted(model for gpu, model in profiles.shipped() if gpu == gpu_type)


def validate_entry(entry: CatalogueEntry, profiles: ProfileStore) -> CatalogueEntry:
    """The entry with canonical profile and GPU names, or a ``CatalogueError`` naming the first bad field."""
    name = entry.name
    if not isinstance(name, str) or not name or len(name) > 255 or not set(name) <= _NAME_CHARS:
        raise CatalogueError(f"name = {name!r} must be 1-255 characters of letters, digits and ._-/:")
    for field in ("profile", "gpu_type", "engine", "engine_args", "account"):
        if not isinstance(getattr(entry, field), str):
            raise _bad(name, field, getattr(entry, field), "is not text")
    try:
        gpu = profiles.gpu(entry.gpu_type).name
    except UnknownProfileError:
        raise _bad(name, "gpu_type", entry.gpu_type,
                   f"is not a known GPU type (known: {', '.join(sorted(profiles.catalog.gpus))})") from None
    shipped = shipped_profiles(profiles, gpu)
    try:
        profile = profiles.model(entry.profile).name
    except UnknownProfileError:
        profile = None
    if profile not in shipped:
        raise _bad(name, "profile", entry.profile,
                   f"has no shipped profile on {gpu} (shipped: {', '.join(shipped) or 'none'}; "
                   "see `festina profiles list`)")
    if entry.engine not in ENGINES:
        raise _bad(name, "engine", entry.engine, f"must be one of {', '.join(ENGINES)}")
    try:
        split_engine_args(entry.engine_args, entry.engine)
    except EngineArgsError as exc:
        raise _bad(name, "engine_args", entry.engine_args, exc.what) from None
    unknown = unknown_emulated_args(entry.engine_args) if entry.engine == "emulated" else []
    if unknown:
        raise _bad(name, "engine_args", entry.engine_args, f"has flags the emulated engine does not take "
                   f"({', '.join(unknown)}; it takes {', '.join(EMULATED_ENGINE_FLAGS)})")
    _number(name, "ttft_slo_s", entry.ttft_slo_s, positive=True)
    _number(name, "tbt_slo_s", entry.tbt_slo_s, positive=True)
    _integer(name, "min_instances", entry.min_instances)
    _integer(name, "max_instances", entry.max_instances, optional=True)
    if entry.max_instances is not None and entry.max_instances < max(1, entry.min_instances):
        raise _bad(name, "max_instances", entry.max_instances,
                   f"must be at least 1 and at least min_instances ({entry.min_instances})")
    _number(name, "keep_alive_s", entry.keep_alive_s, positive=False, optional=True)
    _integer(name, "max_output_tokens", entry.max_output_tokens, optional=True)
    context_tokens = profiles.model(profile).max_context_tokens
    if entry.max_output_tokens is not None and not 1 <= entry.max_output_tokens <= context_tokens:
        raise _bad(name, "max_output_tokens", entry.max_output_tokens,
                   f"must be between 1 and {profile}'s context length ({context_tokens})")
    if len(entry.account) > 255:
        raise _bad(name, "account", entry.account[:40] + "...", "is longer than 255 characters")
    if entry.account and not _ACCOUNT.fullmatch(entry.account):
        raise _bad(name, "account", entry.account, "may only hold letters, digits and _ . -")
    return replace(entry, profile=profile, gpu_type=gpu)


def _entry(row: CatalogueModel) -> CatalogueEntry:
    return CatalogueEntry(name=row.name, profile=row.profile, gpu_type=row.gpu_type, engine=row.engine,
                          ttft_slo_s=row.ttft_slo_s, tbt_slo_s=row.tbt_slo_s, engine_args=row.engine_args,
                          min_instances=row.min_instances, max_instances=row.max_instances,
                          keep_alive_s=row.keep_alive_s, account=row.account,
                          max_output_tokens=row.max_output_tokens)


class Catalogue:
    """The catalogue over one engine; see the module docstring."""

    def __init__(self, engine: Engine, profiles: ProfileStore, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self.profiles = profiles
        self._clock = clock
        self._transaction = Transactions(engine)

    def add(self, entry: CatalogueEntry) -> CatalogueEntry:
        """Store a new entry; refused when its name, or its profile on its GPU type, is catalogued."""
        entry = validate_entry(entry, self.profiles)
        now = self._clock()
        with self._transaction("models add") as session:
            if session.get(CatalogueModel, entry.name) is not None:
                raise CatalogueError(f"model {entry.name!r} is already in the catalogue "
                                     "(`festina models update` changes it)")
            self._check_profile_free(session, entry)
            session.add(CatalogueModel(**entry.to_json(), created_at=now, updated_at=now))
        return entry

    def list(self) -> list[CatalogueEntry]:
        with self._transaction("models list") as session:
            return [_entry(row) for row in session.scalars(select(CatalogueModel).order_by(CatalogueModel.name))]

    def get(self, name: str) -> CatalogueEntry:
        with self._transaction("models show") as session:
            return _entry(self._row(session, name))

    def update(self, name: str, **changes: Any) -> CatalogueEntry:
        """Change some fields of an entry (validated as a whole, as ``add`` does)."""
        unknown = sorted(set(changes) - set(ENTRY_FIELDS) | ({"name"} & set(changes)))
        if unknown:
            raise CatalogueError(f"model {name!r}: cannot update {', '.join(unknown)}")
        now = self._clock()
        with self._transaction("models update") as session:
            row = self._row(session, name)
            entry = validate_entry(replace(_entry(row), **changes), self.profiles)
            self._check_profile_free(session, entry)
            for field, value in entry.to_json().items():
                setattr(row, field, value)
            row.updated_at = now
            return entry

    def running_instances(self, name: str) -> builtins.list[int]:
        """Ids of the entry's instances not stopped (instances are recorded under the profile name)."""
        with self._transaction("models show") as session:
            row = self._row(session, name)
            return list(session.scalars(select(ModelInstance.id).where(
                ModelInstance.model == row.profile, ModelInstance.phase != InstancePhase.STOPPED)
                .order_by(ModelInstance.id)))

    def remove(self, name: str) -> CatalogueEntry:
        """Delete an entry; refused while any of its instances is not stopped (drain them first)."""
        with self._transaction("models remove") as session:
            row = self._row(session, name)
            running = list(session.scalars(select(ModelInstance.id).where(
                ModelInstance.model == row.profile, ModelInstance.phase != InstancePhase.STOPPED)))
            if running:
                raise CatalogueError(f"model {name!r} has {len(running)} instance(s) running "
                                     f"({', '.join(map(str, sorted(running)))}): `festina models remove "
                                     f"{name} --drain` stops them first")
            entry = _entry(row)
            session.delete(row)
            return entry

    @staticmethod
    def _row(session: Session, name: str) -> CatalogueModel:
        row = session.get(CatalogueModel, name)
        if row is None:
            known = list(session.scalars(select(CatalogueModel.name).order_by(CatalogueModel.name)))
            raise CatalogueError(f"model {name!r} is not in the catalogue (catalogued: {', '.join(known) or 'none'})")
        return row

    @staticmethod
    def _check_profile_free(session: Session, entry: CatalogueEntry) -> None:
        other = session.scalars(select(CatalogueModel.name).where(
            CatalogueModel.profile == entry.profile, CatalogueModel.gpu_type == entry.gpu_type,
            CatalogueModel.name != entry.name)).first()
        if other is not None:
            raise _bad(entry.name, "profile", entry.profile,
                       f"is already served on {entry.gpu_type} as {other!r} (one entry per profile and GPU type)")
