"""The profile lookup benchmark behind ``festina bench profiles``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import AXES


def run_lookup_bench(store: ProfileStore, gpu: str, model: str, queries: int, seed: int) -> dict[str, Any]:
    """Time random in-range lookups, vectorised and one at a time, on one table."""
    start = time.perf_counter()
    table = store.table(gpu, model)
    table_load_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    points = [rng.uniform(*table.bounds(field), size=queries) for field in AXES]
    phases = rng.integers(0, 2, size=queries)

    start = time.perf_counter()
    for phase in (0, 1):
        mask = phases == phase
        table.lookup_many(("prefill", "decode")[phase], *(p[mask] for p in points))
    vectorised_s = time.perf_counter() - start

    single = min(queries, 100_000)
    rows = list(zip(*(p[:single].tolist() for p in points)))
    names = [("prefill", "decode")[int(ph)] for ph in phases[:single]]
    lookup = table.lookup
    start = time.perf_counter()
    for phase, (batch, context, sm, clock) in zip(names, rows):
        lookup(phase, batch, context, sm, clock)
    single_s = time.perf_counter() - start
    return {
        "gpu": table.gpu,
        "model": table.model,
        "table_load_s": table_load_s,
        "queries_vectorised": queries,
        "seconds_vectorised": vectorised_s,
        "lookups_per_s_vectorised": queries / vectorised_s,
        "queries_single": single,
        "seconds_single": single_s,
        "lookups_per_s_single": single / single_s,
    }
