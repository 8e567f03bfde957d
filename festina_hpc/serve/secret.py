"""An instance's secret: made by festinad, kept in a file only the job's user can read, checked by the server.

festinad writes one random secret per instance into ``<secret_dir>/instance-<id>.secret``
(directory 0700, file 0600, both festinad's user, which is also the job's user) and
passes the job the file's path; the server answers ``/v1/*``, ``/admin/settings``
and ``/metrics`` only with it (``serve/server.py``). festinad keeps the secret in
memory and re-reads the file after a restart; festina-node (root on the node) reads
it by the same name from the job's instance label, but only when the file belongs
to the job's own user (``read_owned_secret``): a job's comment is the user's to
write, so a label naming someone else's instance must not make root hand that
instance's secret to the port the comment names.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from festina_hpc.errors import FestinaError

SECRET_BYTES = 32  # token_urlsafe(32): 43 characters, 256 random bits
_MAX_FILE_BYTES = 4096
_MIN_CHARS = 16


def secret_path(secret_dir: str | Path, instance: str | int) -> Path:
    """Where the secret of instance ``instance`` (festinad's id, or a job comment's label) lives."""
    return Path(secret_dir) / f"instance-{instance}.secret"


def write_secret(secret_dir: str | Path, instance: str | int) -> tuple[Path, str]:
    """A new secret for ``instance``, written 0600 (the directory made 0700 if missing); its path and value."""
    directory = Path(secret_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise FestinaError(f"secret_dir {str(directory)!r} cannot be made: {exc.strerror or exc}") from None
    # Whoever else owns or may write the directory could swap a file for one whose secret they know.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise FestinaError(f"secret_dir {str(directory)!r} must be a directory of this user (uid {os.geteuid()}) "
                           f"that no one else may open (mode 700); it is mode {stat.S_IMODE(info.st_mode):o}, "
                           f"uid {info.st_uid}")
    path = secret_path(directory, instance)
    value = secrets.token_urlsafe(SECRET_BYTES)
    try:
        path.unlink(missing_ok=True)  # a requeued id's old file, or a link someone left: never written through
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise FestinaError(f"secret file {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(value + "\n")
    return path, value


def _parse(text: str, path: str) -> str:
    value = text.strip().split("\n", 1)[0].strip()
    if len(value) < _MIN_CHARS:
        raise FestinaError(f"secret file {path!r} holds no secret of {_MIN_CHARS} or more characters")
    return value


def read_secret_file(path: str | Path) -> str:
    """The secret in ``path`` (its first line); ``FestinaError`` naming the path when it cannot be used.

    Refused when the group or others may read it: a secret others can read protects nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            mode = os.fstat(fd).st_mode
            data = os.read(fd, _MAX_FILE_BYTES) if stat.S_ISREG(mode) else b""
        finally:
            os.close(fd)
    except OSError as exc:
        raise FestinaError(f"secret file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise FestinaError(f"secret file {str(path)!r} has mode {mode & 0o777:o}: make it 600 (only you may read it)")
    try:
        return _parse(data.decode("ascii"), str(path))
    except UnicodeDecodeError:
        raise FestinaError(f"secret file {str(path)!r} is not ASCII text") from None


def read_owned_secret(path: str | Path, uid: int) -> str | None:
    """The secret in ``path`` when it is a regular file of user ``uid`` that no one else may read, else None.

    For a reader with more rights than the file's owner (root on a node): a link, another user's file or a
    file others can read is refused, so a path chosen by a user never reveals what that user cannot read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
            return None
        data = os.read(fd, _MAX_FILE_BYTES)
    finally:
        os.close(fd)
    try:
        return _parse(data.decode("ascii"), str(path))
    except (UnicodeDecodeError, FestinaError):
        return None
