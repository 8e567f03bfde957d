"""An instance's secret file: written 0600, refused when others may read it, and never read for another user."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from festina_hpc.errors import FestinaError
from festina_hpc.serve.secret import read_owned_secret, read_secret_file, secret_path, write_secret
from tests.serve.test_cli_serve import serve_process


def test_a_written_secret_is_only_its_owners(tmp_path: Path) -> None:
    old = os.umask(0)  # the file's mode must not depend on the caller's umask
    try:
        path, value = write_secret(tmp_path / "secrets", 7)
    finally:
        os.umask(old)
    assert path == secret_path(tmp_path / "secrets", 7)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(value) >= 40 and read_secret_file(path) == value
    again, other = write_secret(tmp_path / "secrets", 7)
    assert again == path and other != value and read_secret_file(path) == other


def test_a_secret_is_never_written_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep\n")
    (tmp_path / "s").mkdir(mode=0o700)
    secret_path(tmp_path / "s", 1).symlink_to(target)
    write_secret(tmp_path / "s", 1)
    assert target.read_text() == "keep\n"


def test_a_secret_dir_others_may_open_is_refused(tmp_path: Path) -> None:
    # Whoever may write the directory could swap the file for one whose secret they know.
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(FestinaError, match="must be a directory of this user .* it is mode 777"):
        write_secret(tmp_path / "open", 1)
    assert not secret_path(tmp_path / "open", 1).exists()


@pytest.mark.parametrize("case, mode, text, message", [
    ("readable by others", 0o644, "x" * 43, "has mode 644: make it 600"),
    ("too short", 0o600, "short", "no secret of 16"),
])
def test_an_unusable_secret_file_is_refused_naming_it(tmp_path: Path, case: str, mode: int, text: str,
                                                      message: str) -> None:
    path = tmp_path / "f"
    path.write_text(text)
    path.chmod(mode)
    with pytest.raises(FestinaError, match=message):
        read_secret_file(path)
    assert read_owned_secret(path, os.getuid()) is None


def test_root_reads_a_secret_only_for_its_owner(tmp_path: Path) -> None:
    path, value = write_secret(tmp_path, "a")
    assert read_owned_secret(path, os.getuid()) == value
    assert read_owned_secret(path, os.getuid() + 1) is None  # the job's user does not own it
    link = tmp_path / "link"
    link.symlink_to(path)
    assert read_owned_secret(link, os.getuid()) is None
    assert read_owned_secret(tmp_path, os.getuid()) is None  # a directory
    assert read_owned_secret(tmp_path / "missing", os.getuid()) is None


def test_festina_serve_with_a_secret_file_guards_completions(tmp_path: Path) -> None:
    path, value = write_secret(tmp_path, 1)
    with serve_process("--secret-file", str(path)) as (proc, url):
        assert value not in " ".join(proc.args)  # type: ignore[arg-type]

        async def calls() -> list[int]:
            async with aiohttp.ClientSession() as session:
                statuses = []
                for headers in ({}, {"Authorization": f"Bearer {value}"}):
                    async with session.post(f"{url}/v1/completions", headers=headers,
                                            json={"model": "llama-3.1-8b", "prompt": "x", "max_tokens": 1}) as r:
                        statuses.append(r.status)
                return statuses

        import asyncio
        assert asyncio.run(calls()) == [401, 200]


def test_festina_serve_refuses_a_secret_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("x" * 43)
    path.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k != "FESTINA_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "festina_hpc.cli.main", "serve", "--model", "llama-3.1-8b",
                           "--gpu-type", "h100", "--port", "0", "--secret-file", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "has mode 644: make it 600" in done.stderr and "Traceback" not in done.stderr


def test_the_vllm_wrapper_sets_the_key_from_the_file_not_argv(tmp_path: Path) -> None:
    path, value = write_secret(tmp_path, 2)
    done = subprocess.run([sys.executable, "-m", "festina_hpc.serve.launch", "--secret-file", str(path), "--",
                           sys.executable, "-c", "import os; print(os.environ['VLLM_API_KEY'])"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == value
