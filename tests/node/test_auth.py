"""Head-to-node message authentication: MUNGE credentials and the shared-secret HMAC; forgeries and replays refused."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from festina_hpc.errors import ConfigError
from festina_hpc.node.auth import (
    AuthRefused,
    ControlMessage,
    Munge,
    MungeSigner,
    ReplayCache,
    SecretSigner,
    Verifier,
    load_secret,
)
from tests.node.conftest import private_munged

KEY = b"k" * 32
NOW_S = 1_800_000_000.0


def message(**changes: object) -> ControlMessage:
    base = ControlMessage("lock_clocks", {"gpu": 0, "clock_mhz": 1200}, "n1", NOW_S, "a" * 32)
    return replace(base, **changes)  # type: ignore[arg-type]


def secret_verifier(now_s: float = NOW_S) -> Verifier:
    return Verifier("n1", "secret", key=KEY, window_s=30.0, clock=lambda: now_s)


def test_the_canonical_form_binds_every_field_and_ignores_key_order() -> None:
    m = message()
    assert m.canonical() == replace(m, args={"clock_mhz": 1200, "gpu": 0}).canonical()
    for changed in (message(op="reset_clocks"), message(args={"gpu": 0, "clock_mhz": 1201}), message(node="n2"),
                    message(issued_unix_s=NOW_S + 1), message(nonce="b" * 32)):
        assert changed.canonical() != m.canonical()


def test_a_signed_message_passes_once() -> None:
    verifier = secret_verifier()
    m = message()
    verifier.verify(m, "secret", SecretSigner(KEY).sign(m))
    with pytest.raises(AuthRefused, match="already used"):
        verifier.verify(m, "secret", SecretSigner(KEY).sign(m))


@pytest.mark.parametrize(("case", "sent", "credential_for", "reason"), [
    ("args changed after signing", message(args={"gpu": 0, "clock_mhz": 600}), message(), "HMAC does not match"),
    ("another node's message", message(node="n2"), message(node="n2"), "meant for node 'n2'"),
    ("forged for this node from another's", message(), message(node="n2"), "HMAC does not match"),
    ("old timestamp", message(issued_unix_s=NOW_S - 31), message(issued_unix_s=NOW_S - 31), "outside the 30 s window"),
    ("from the future", message(issued_unix_s=NOW_S + 31), message(issued_unix_s=NOW_S + 31), "outside the 30 s"),
])
def test_forged_stale_or_misdirected_messages_are_refused(case: str, sent: ControlMessage,
                                                          credential_for: ControlMessage, reason: str) -> None:
    with pytest.raises(AuthRefused, match=reason):
        secret_verifier().verify(sent, "secret", SecretSigner(KEY).sign(credential_for))


def test_a_tampered_or_wrongly_keyed_hmac_is_refused_and_does_not_spend_the_nonce() -> None:
    verifier = secret_verifier()
    m = message()
    good = SecretSigner(KEY).sign(m)
    for bad in (good[:-1] + ("0" if good[-1] != "0" else "1"), SecretSigner(b"x" * 32).sign(m), "", "garbage"):
        with pytest.raises(AuthRefused, match="HMAC does not match"):
            verifier.verify(m, "secret", bad)
    verifier.verify(m, "secret", good)  # the forgeries did not use up the genuine message's nonce


def test_the_scheme_must_be_the_nodes() -> None:
    with pytest.raises(AuthRefused, match="is not this node's"):
        secret_verifier().verify(message(), "munge", "MUNGE:abc")


@pytest.mark.parametrize("raw", [
    [], {"op": "status"}, {"op": "status", "args": {}, "node": "n1", "issued_unix_s": NOW_S, "nonce": "short",
                           "auth": {"scheme": "secret", "credential": "x"}},
    {"op": "status", "args": [], "node": "n1", "issued_unix_s": True, "nonce": "a" * 32,
     "auth": {"scheme": "secret", "credential": "x"}},
])
def test_malformed_messages_are_refused(raw: object) -> None:
    with pytest.raises(AuthRefused):
        ControlMessage.from_wire(raw)


def test_the_wire_form_round_trips() -> None:
    m = message()
    assert ControlMessage.from_wire(m.to_wire("secret", "c")) == (m, "secret", "c")


def test_the_replay_cache_forgets_only_after_twice_the_window() -> None:
    cache = ReplayCache(30.0)
    assert cache.first_time("n", 0.0) and not cache.first_time("n", 59.0)
    assert cache.first_time("n", 61.0)


@pytest.mark.parametrize(("mode", "content", "reason"), [
    (0o644, KEY, "mode 644 lets group or others read"),
    (0o640, KEY, "mode 640"),
    (0o604, KEY, "mode 604"),
    (0o600, b"short", "fewer than 32"),
])
def test_a_secret_file_others_may_read_or_too_short_is_refused(tmp_path: Path, mode: int, content: bytes,
                                                               reason: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=reason):
        load_secret(path)


def test_a_private_secret_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)
    assert load_secret(path) == KEY
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path / "missing")


def test_secret_auth_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="needs a key"):
        Verifier("n1", "secret")


# -- MUNGE, on a munged of the tests' own ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def munge() -> Iterator[Munge]:
    with private_munged() as sock:
        yield Munge(str(sock))


def munge_verifier(munge: Munge, allowed_uids: frozenset[int] = frozenset({0, os.geteuid()})) -> Verifier:
    return Verifier("n1", "munge", munge=munge, allowed_uids=allowed_uids, window_s=30.0)


def fresh(**changes: object) -> ControlMessage:
    return replace(ControlMessage.new("lock_clocks", {"gpu": 0, "clock_mhz": 1200}, "n1", time.time()),
                   **changes)  # type: ignore[arg-type]


def test_a_munge_signed_message_passes(munge: Munge) -> None:
    m = fresh()
    munge_verifier(munge).verify(m, "munge", MungeSigner(munge).sign(m))


def test_a_munge_credential_for_another_payload_is_refused(munge: Munge) -> None:
    m = fresh()
    forged = replace(m, args={"gpu": 0, "clock_mhz": 600})
    with pytest.raises(AuthRefused, match="made for another message"):
        munge_verifier(munge).verify(forged, "munge", MungeSigner(munge).sign(m))


def test_a_munge_credential_of_another_uid_is_refused(munge: Munge) -> None:
    m = fresh()
    with pytest.raises(AuthRefused, match=f"MUNGE credential of uid {os.geteuid()}, neither root"):
        munge_verifier(munge, frozenset({4242})).verify(m, "munge", MungeSigner(munge).sign(m))


@pytest.mark.skipif(os.geteuid() != 0, reason="making a credential as nobody needs root")
def test_a_credential_made_by_nobody_is_refused(munge: Munge) -> None:
    m = fresh()
    done = subprocess.run(["munge", "--socket", munge.socket], input=m.digest().encode(), user="nobody",
                          capture_output=True, check=True)
    with pytest.raises(AuthRefused, match="MUNGE credential of uid 65534"):
        munge_verifier(munge, frozenset({0})).verify(m, "munge", done.stdout.decode().strip())


def test_a_credential_of_another_munge_key_or_garbage_is_refused(munge: Munge) -> None:
    m = fresh()
    with private_munged("festina-munge-other-") as other:
        foreign = MungeSigner(Munge(str(other))).sign(m)
    for credential, reason in ((foreign, "Invalid credential"), ("garbage", "armor prefix"),
                               ("MUNGE:AAAA:", "refused")):
        with pytest.raises(AuthRefused, match=reason):
            munge_verifier(munge).verify(m, "munge", credential)


def test_munged_itself_refuses_a_credential_decoded_twice(munge: Munge) -> None:
    m = fresh()
    credential = MungeSigner(munge).sign(m)
    munge.decode(credential)
    with pytest.raises(AuthRefused, match="Replayed credential"):
        munge.decode(credential)
