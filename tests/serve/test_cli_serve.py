"""``festina serve`` as a process: prints its URL, serves, and on SIGTERM drains or stops within seconds."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest

from festina_hpc.cli.main import main
from tests.serve.conftest import MODEL, Streamed, stream

URL_LINE = re.compile(r"^festina serve: (http://127\.0\.0\.1:\d+) "
                      r"\(llama-3\.1-8b on h100-sxm-80gb, simulated engine\)$")


@contextmanager
def serve_process(*extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {k: v for k, v in os.environ.items() if k != "FESTINA_CONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "festina_hpc.cli.main", "serve", "--model", MODEL,
                             "--gpu-type", "h100", "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = URL_LINE.match(line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def sigterm_after_first_token(proc: subprocess.Popen[str], url: str, max_tokens: int) -> tuple[Streamed, int]:
    """Stream one request, SIGTERM the server at its first token; (the stream, a later request's status)."""
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(stream(session, url, {"model": MODEL, "prompt": "hi", "max_tokens": max_tokens}))
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 200
        while True:
            await asyncio.sleep(0.005)
            async with session.get(f"{url}/metrics") as resp:
                if "festina_serve_generation_tokens_total" in (text := await resp.text()) and re.search(
                        r"festina_serve_generation_tokens_total\{[^}]*\} [1-9]", text):
                    break
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        try:
            async with session.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}) as resp:
                late_status = resp.status
                assert resp.headers.get("Retry-After")
        except aiohttp.ClientConnectionError:
            late_status = 0
        return await task, late_status


def test_sigterm_finishes_in_flight_requests() -> None:
    with serve_process("--time-scale", "3", "--drain-s", "5") as (proc, url):
        got, late_status = asyncio.run(sigterm_after_first_token(proc, url, max_tokens=8))
        assert proc.wait(timeout=5) == 0
        assert got.done and len(got.token_times_s) == 8  # finished despite the SIGTERM mid-stream
        assert late_status == 503  # a request during the drain is refused
        assert proc.stdout is not None and "festina serve: stopped" in proc.stdout.read()


def test_sigterm_stops_within_the_drain_time() -> None:
    with serve_process("--time-scale", "3", "--drain-s", "0.3") as (proc, url):
        started = time.monotonic()
        got, _ = asyncio.run(sigterm_after_first_token(proc, url, max_tokens=2000))  # ~80 s of tokens
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 3.0
        assert not got.done and 1 <= len(got.token_times_s) < 2000  # cut, and the client can tell


def test_unknown_model_is_one_line_error(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FESTINA_CONFIG", raising=False)
    assert main(["serve", "--model", "gpt-9", "--gpu-type", "h100", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("festina: error: unknown model 'gpt-9'") and err.count("\n") == 1
