"""The database's user-facing errors: each a one-line ``FestinaError`` naming the URL or the field."""

from __future__ import annotations

from festina_hpc.errors import FestinaError


class DatabaseError(FestinaError):
    """A database operation failed (bad URL, schema out of date, constraint violated)."""


class DatabaseUnavailable(DatabaseError):
    """The database does not answer (server down, file not openable); the message names the URL."""


class InvalidRecord(DatabaseError):
    """A record handed to the store is invalid; the message names the field and the value.

    Raised before anything is written, so the transaction it belongs to stores nothing.
    """
