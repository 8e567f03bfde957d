"""Authenticated head-to-node control messages: festinad signs a message, festina-node verifies it before acting.

A message is ``{op, args, node, issued_unix_s, nonce}`` plus its credential;
the credential covers the message's canonical JSON (sorted keys, no spaces),
so changing any field, the node it is meant for included, breaks it. Two
schemes:

- ``munge`` (default): a MUNGE credential whose payload is the SHA-256 of
  the canonical JSON, made by ``munge`` on the head node and checked by
  ``unmunge`` on the node (every Slurm cluster already shares the key). The
  credential also says who made it: its UID must be festinad's user or root.
  munged itself refuses a credential decoded twice on the same host
  ("Replayed credential") and one past its TTL; we check the timestamp and
  the nonce as well, so the rule does not depend on munged's cache and is the
  same for both schemes.
- ``secret``: HMAC-SHA256 of the canonical JSON under a key file that only
  root (or festinad's user) may read, for sites without MUNGE.

Then: the node name must be this node's, ``issued_unix_s`` within
``window_s`` of the node's clock, and the nonce unseen within the window
(the replay cache forgets a nonce once its message would be too old anyway).
The nonce is recorded only after the credential checks out, so a forgery
cannot spend a genuine message's nonce. ``munge``/``unmunge`` run as argv
lists, never through a shell.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from festina_hpc.errors import ConfigError
from festina_hpc.node.errors import NodeError

SCHEMES = ("munge", "secret")
DEFAULT_WINDOW_S = 30.0
MIN_SECRET_BYTES = 32


class AuthRefused(NodeError):
    """A control message was refused: forged, replayed, stale, or meant for another node."""


@dataclass(frozen=True)
class ControlMessage:
    """One request from festinad to one node's festina-node; the credential covers every field."""

    op: str
    args: Mapping[str, Any]
    node: str  # the node it is meant for: a message for n1 is refused by n2
    issued_unix_s: float  # when festinad made it (wall clock)
    nonce: str  # random, never reused: the same message twice is a replay

    @classmethod
    def new(cls, op: str, args: Mapping[str, Any], node: str, now_unix_s: float) -> ControlMessage:
        return cls(op, dict(args), node, float(now_unix_s), secrets.token_hex(16))

    def canonical(self) -> bytes:
        """What the credential covers: compact JSON with sorted keys, the same bytes on both sides."""
        return json.dumps({"op": self.op, "args": self.args, "node": self.node, "issued_unix_s": self.issued_unix_s,
                           "nonce": self.nonce}, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def to_wire(self, scheme: str, credential: str) -> dict[str, Any]:
        return {"op": self.op, "args": dict(self.args), "node": self.node, "issued_unix_s": self.issued_unix_s,
                "nonce": self.nonce, "auth": {"scheme": scheme, "credential": credential}}

    @classmethod
    def from_wire(cls, raw: Any) -> tuple[ControlMessage, str, str]:
        """The message, its scheme and credential from a parsed request; ``AuthRefused`` when malformed."""
        if not isinstance(raw, dict):
            raise AuthRefused("a control message is a JSON object")
        auth = raw.get("auth")
        if not isinstance(auth, dict) or not isinstance(auth.get("scheme"), str) \
                or not isinstance(auth.get("credential"), str):
            raise AuthRefused("no credential (auth.scheme and auth.credential)")
        op, args, node, issued, nonce = (raw.get(k) for k in ("op", "args", "node", "issued_unix_s", "nonce"))
        if not isinstance(op, str) or not isinstance(args, dict) or not isinstance(node, str) \
                or not isinstance(nonce, str) or not 16 <= len(nonce) <= 128 \
                or isinstance(issued, bool) or not isinstance(issued, int | float):
            raise AuthRefused("a control message needs op, args, node, issued_unix_s and a nonce of 16..128 chars")
        return cls(op, args, node, float(issued), nonce), auth["scheme"], auth["credential"]


# -- MUNGE -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """What ``unmunge`` says about a valid credential."""

    uid: int
    payload: bytes


@dataclass(frozen=True)
class Munge:
    """The ``munge`` and ``unmunge`` tools on one munged socket ("" = munge's default socket)."""

    socket: str = ""
    munge: str = "munge"
    unmunge: str = "unmunge"
    timeout_s: float = 10.0

    def _argv(self, tool: str, *extra: str) -> list[str]:
        return [tool, *(["--socket", self.socket] if self.socket else []), *extra]

    def _run(self, argv: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(argv, input=data, capture_output=True, timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NodeError(f"{argv[0]}: {getattr(exc, 'strerror', None) or exc}") from None

    def encode(self, payload: bytes, ttl_s: int) -> str:
        done = self._run(self._argv(self.munge, "--ttl", str(ttl_s)), payload)
        if done.returncode != 0:
            raise NodeError(f"munge failed: {_last_line(done.stderr)}")
        return done.stdout.decode().strip()

    def decode(self, credential: str) -> Decoded:
        """The credential's UID and payload; ``AuthRefused`` with unmunge's reason (invalid, expired, replayed)."""
        done = self._run(self._argv(self.unmunge, "--numeric", "--keys=UID"), credential.encode())
        if done.returncode != 0:
            # unmunge prints no error for these three; it only exits with the status.
            reason = _CREDENTIAL_STATUS.get(done.returncode) or _last_line(done.stderr).removeprefix("unmunge: Error: ")
            if done.returncode < FIRST_CREDENTIAL_STATUS:  # munged unreachable, out of memory: not the sender's fault
                raise NodeError(f"unmunge failed: {reason}")
            raise AuthRefused(f"MUNGE credential refused: {reason}")
        # Metadata lines, one blank line, then the payload as it was given.
        head, sep, payload = done.stdout.partition(b"\n\n")
        fields = dict(line.split(b":", 1) for line in head.splitlines() if b":" in line)
        uid = fields.get(b"UID", b"").strip()
        if not sep or not uid.isdigit():
            raise AuthRefused("MUNGE credential refused: unmunge gave no UID")
        return Decoded(int(uid), payload)


# unmunge's exit status is munge_err_t: 1..7 are local failures (munged's socket, a timeout), 8 and up say
# what is wrong with the credential.
FIRST_CREDENTIAL_STATUS = 8
_CREDENTIAL_STATUS = {15: "Expired credential", 16: "Rewound credential", 17: "Replayed credential"}


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


# -- signing (festinad's side) -----------------------------------------------------------------------------------


class Signer(Protocol):
    @property
    def scheme(self) -> str:
        """``munge`` or ``secret``: what the node must be configured for."""
        ...

    def sign(self, message: ControlMessage) -> str:
        """The credential for exactly this message."""
        ...


@dataclass(frozen=True)
class MungeSigner:
    munge: Munge
    ttl_s: int = int(DEFAULT_WINDOW_S)
    scheme: str = "munge"

    def sign(self, message: ControlMessage) -> str:
        return self.munge.encode(message.digest().encode(), self.ttl_s)


@dataclass(frozen=True)
class SecretSigner:
    key: bytes = field(repr=False)
    scheme: str = "secret"

    def sign(self, message: ControlMessage) -> str:
        return hmac_of(self.key, message)


def hmac_of(key: bytes, message: ControlMessage) -> str:
    return hmac.new(key, message.canonical(), hashlib.sha256).hexdigest()


def load_secret(path: Path) -> bytes:
    """The shared key; ``ConfigError`` unless the file is private (no group or other bits) and long enough."""
    try:
        info = path.stat()
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the control secret: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise ConfigError(f"{path}: mode {stat.S_IMODE(info.st_mode):03o} lets group or others read the control "
                          f"secret: chmod 600 it")
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: the control secret is owned by uid {info.st_uid}, not root or this user")
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(f"{path}: the control secret has {len(key)} bytes, fewer than {MIN_SECRET_BYTES} "
                          f"(make one with `openssl rand -hex 32`)")
    return key


# -- verifying (the node's side) ---------------------------------------------------------------------------------


class ReplayCache:
    """Nonces seen in the last ``window_s`` (twice the window: a message may be that far in the future too)."""

    def __init__(self, window_s: float):
        self._keep_s = 2 * window_s
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def first_time(self, nonce: str, now_s: float) -> bool:
        """Records ``nonce``; False when it was already there (a replay)."""
        with self._lock:
            for old in [n for n, until in self._seen.items() if until < now_s]:
                del self._seen[old]
            if nonce in self._seen:
                return False
            self._seen[nonce] = now_s + self._keep_s
            return True


class Verifier:
    """Checks control messages for one node: ``verify`` returns, or raises ``AuthRefused`` saying why."""

    def __init__(self, node: str, scheme: str, *, allowed_uids: frozenset[int] = frozenset({0}),
                 munge: Munge | None = None, key: bytes | None = None, window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.time):
        if scheme not in SCHEMES:
            raise ConfigError(f"control auth {scheme!r} is not one of {', '.join(SCHEMES)}")
        if scheme == "secret" and key is None:
            raise ConfigError("control auth 'secret' needs a key (control_secret_file)")
        self.node = node
        self.scheme = scheme
        self._allowed_uids = allowed_uids
        self._munge = munge or Munge()
        self._key = key
        self._window_s = window_s
        self._clock = clock
        self._replays = ReplayCache(window_s)

    def verify(self, message: ControlMessage, scheme: str, credential: str) -> None:
        if scheme != self.scheme:
            raise AuthRefused(f"scheme {scheme[:20]!r} is not this node's ({self.scheme})")
        if message.node != self.node:
            raise AuthRefused(f"meant for node {message.node[:64]!r}, this is {self.node}")
        now_s = self._clock()
        age_s = now_s - message.issued_unix_s
        if abs(age_s) > self._window_s:
            raise AuthRefused(f"issued {age_s:.0f} s ago, outside the {self._window_s:g} s window (replayed, "
                              f"or the clocks differ)")
        if self.scheme == "munge":
            decoded = self._munge.decode(credential)
            if decoded.uid not in self._allowed_uids:
                raise AuthRefused(f"MUNGE credential of uid {decoded.uid}, neither root nor festinad's user")
            if not hmac.compare_digest(decoded.payload, message.digest().encode()):
                raise AuthRefused("MUNGE credential was made for another message")
        else:
            assert self._key is not None
            if not hmac.compare_digest(credential.encode(), hmac_of(self._key, message).encode()):
                raise AuthRefused("HMAC does not match the message")
        if not self._replays.first_time(message.nonce, now_s):
            raise AuthRefused(f"nonce {message.nonce[:32]} already used (replayed)")
