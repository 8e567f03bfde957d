"""Checks on everything that ends up in a Slurm argv or an sbatch script line.

Slurm commands are always argv lists, so nothing here guards against a shell;
these checks keep values from changing the meaning of an argument
(``JobId=1 NodeList=...`` smuggled in a job id, a newline ending an
``#SBATCH`` line) and turn bad input into a one-line ``SlurmInputError``
before any command runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from festina_hpc.slurm.errors import SlurmInputError

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_SAFE_TEXT = re.compile(r"[A-Za-z0-9_.,:=@/+%-]+")
_PATH = re.compile(r"/[A-Za-z0-9_.,:=@/+%-]*")
# Model names look like "llama-3.1-8b" or "meta-llama/Llama-3.1-8B".
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./:-]{0,127}")
_REASON_MAX_CHARS = 256
_ADMIN_COMMENT_MAX_CHARS = 1024
# Slurm's job ids are 32-bit (uint32_t in slurm.h).
MAX_JOB_ID = 2**32 - 1
_JOB_ID_MAX_DIGITS = len(str(MAX_JOB_ID))


def job_id(value: int | str) -> int:
    """A plain positive job id (array and het-job ids are not used by festina), at most ``MAX_JOB_ID``."""
    if isinstance(value, bool):
        raise SlurmInputError(f"job id {_shown(value)} is not a positive integer")
    if isinstance(value, int):
        number = value
    # Length first: int() of a 100,000-digit string is slow and then raises ValueError, not a one-line refusal.
    elif (isinstance(value, str) and len(value) <= _JOB_ID_MAX_DIGITS and value.isascii()
          and value.isdigit()):
        number = int(value)
    else:
        raise SlurmInputError(f"job id {_shown(value)} is not a positive integer of at most "
                              f"{_JOB_ID_MAX_DIGITS} digits")
    if not 0 < number <= MAX_JOB_ID:
        raise SlurmInputError(f"job id {_shown(value)} is not a positive integer up to {MAX_JOB_ID}")
    return number


def _shown(value: object, limit: int = 40) -> str:
    """``value`` for a one-line error: escaped (``repr``), and cut with its length past ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<integer of {value.bit_length()} bits>"  # str() of a huge int is itself slow and limited
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def node_name(value: str) -> str:
    if not isinstance(value, str) or not _NODE_NAME.fullmatch(value):
        raise SlurmInputError(f"node name {value!r} is not a plain host name (letters, digits, '_', '.', '-')")
    return value


def node_names(values: Iterable[str], what: str = "node list") -> tuple[str, ...]:
    """Plain node names (no hostlist expressions, so the caller's list is exactly what Slurm sees)."""
    if isinstance(values, str):
        raise SlurmInputError(f"{what} must be a list of node names, got the string {values!r}")
    names = tuple(node_name(v) for v in values)
    if len(set(names)) != len(names):
        raise SlurmInputError(f"{what} {','.join(names)} names a node twice")
    return names


def reason(value: str) -> str:
    """A drain reason: printable, one line, not empty (Slurm requires one for DRAIN)."""
    if not isinstance(value, str) or not value.strip():
        raise SlurmInputError("a drain reason must not be empty")
    if len(value) > _REASON_MAX_CHARS or not value.isprintable():
        raise SlurmInputError(f"reason {value[:40]!r} must be one printable line of at most {_REASON_MAX_CHARS} "
                              f"characters")
    return value


def safe_text(value: str, what: str) -> str:
    """A value for an ``#SBATCH`` line or ``Key=value`` argument: no spaces, quotes or newlines."""
    if not isinstance(value, str) or not _SAFE_TEXT.fullmatch(value):
        raise SlurmInputError(f"{what} {value!r} may only hold letters, digits and _ . , : = @ / + % -")
    return value


def model_name(value: str) -> str:
    if not isinstance(value, str) or not _MODEL.fullmatch(value):
        raise SlurmInputError(f"model name {value!r} may only hold letters, digits and _ . / : -")
    return value


def abs_path(value: str, what: str) -> str:
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        raise SlurmInputError(f"{what} {value!r} must be an absolute path of letters, digits and _ . , : = @ / + % -")
    return value


def admin_comment(value: str) -> str:
    """An AdminComment festina writes: one token of ``safe_text`` characters, at most 1024 of them."""
    if isinstance(value, str) and len(value) > _ADMIN_COMMENT_MAX_CHARS:
        raise SlurmInputError(f"admin comment {value[:40]!r}... is longer than {_ADMIN_COMMENT_MAX_CHARS} characters")
    return safe_text(value, "admin comment")
