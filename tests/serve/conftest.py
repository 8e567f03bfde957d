"""Builders the serving and gateway tests share: the shipped profiles, engines, and a timing SSE client.

Serving tests pace by the shipped llama-3.1-8b on h100-sxm-80gb profile (about
14 ms per prefill of a short prompt and per decode step), the smallest model
shipped, so a request of a few tokens takes a fraction of a second.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.engine import EngineSettings, SimulatedEngine
from tests.conftest import REPO_PROFILES

MODEL = "llama-3.1-8b"
GPU = "h100-sxm-80gb"


@pytest.fixture(scope="session")
def store() -> ProfileStore:
    return ProfileStore(REPO_PROFILES)


def make_engine(store: ProfileStore, time_scale: float = 1.0, model: str = MODEL, **settings: Any) -> SimulatedEngine:
    return SimulatedEngine(store, model, GPU, EngineSettings(**settings), time_scale=time_scale)


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@dataclass
class Streamed:
    """What a client saw of one streamed completion: status, events and when each arrived."""

    status: int
    start_s: float
    events: list[dict[str, Any]] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)  # of token-bearing events
    done: bool = False
    body: Any = None  # the JSON body of a non-200 answer

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.start_s

    @property
    def tbt_mean_s(self) -> float:
        times = self.token_times_s
        return (times[-1] - times[0]) / (len(times) - 1)

    @property
    def text(self) -> str:
        return "".join(e["choices"][0]["text"] for e in self.events if e.get("choices"))


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Streamed:
    """POST a streaming completion and time its events."""
    start = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as resp:
        result = Streamed(resp.status, start)
        if resp.status != 200:
            result.body = await resp.json()
            return result
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                result.done = True
                break
            event = json.loads(payload)
            result.events.append(event)
            if event.get("choices") and event["choices"][0]["text"]:
                result.token_times_s.append(time.perf_counter())
    return result
