"""Builders the simulator tests share: a three-model mix, its SLOs and seeded Poisson request lists."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from festina_hpc.policy.types import Request, Slo
from tests.policy.conftest import slos_for

MODELS = ("llama-3.1-8b", "mistral-7b", "codellama-34b")


def slos(models: Iterable[str] = MODELS) -> dict[str, Slo]:
    """5x the unloaded latencies at max clock, as tests.policy.conftest defines them."""
    return slos_for(models)


def poisson_requests(n: int, rate_per_s: float, seed: int, models: tuple[str, ...] = MODELS, start_s: float = 0.0,
                     first_id: int = 0, min_prompt_tokens: int = 20) -> list[Request]:
    """``n`` requests arriving at ``rate_per_s`` from ``start_s``, spread uniformly over ``models``."""
    rng = np.random.default_rng(seed)
    arrivals = start_s + np.cumsum(rng.exponential(1 / rate_per_s, n))
    chosen = rng.integers(0, len(models), n)
    prompts = rng.integers(min_prompt_tokens, 3000, n)
    outputs = rng.integers(1, 600, n)
    return [Request(first_id + i, float(arrivals[i]), models[chosen[i]], int(prompts[i]), int(outputs[i]))
            for i in range(n)]
