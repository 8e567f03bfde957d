"""The profile lookup benchmark behind ``festina bench profiles``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import AXES, PHASES


def run_lookup_bench(store: ProfileStore, gpu: str, model: str, queries: int, seed: int) -> dict[str, Any]:
    """Time random in-range lookups, vectorised and one at a time, on one table."""
    start = time.perf_counter()
    table = store.table(gpu, model)
    table_load_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    points = [rng.uniform(*table.bounds(field), size=queries) for field in AXES]
    phases = rng.integers(0, 2, size=queries)

    start = time.perf_counter()
    for phase_index, phase_name in enumerate(PHASES):
        mask = phases == phase_index
        table.lookup_many(phase_name, *(p[mask] for p in points))
    vectorised_s = time.perf_counter() - start

    single = min(queries, 100_000)
    rows = list(zip(*(p[:single].tolist() for p in points)))
    names = [PHASES[int(ph)] for ph in phases[:single]]
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


def run_predict_process_bench(store: ProfileStore) -> dict[str, Any]:
    """Wall time of one ``festina profiles predict`` process per shipped (GPU, model) pair."""
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "festina.toml"
        config.write_text(f"[profiles]\ndir = {json.dumps(str(store.dir))}\n", encoding="utf-8")
        for gpu, model in store.shipped():
            argv = [sys.executable, "-m", "festina_hpc.cli.main", "--config", str(config), "profiles", "predict",
                    "--gpu", gpu, "--model", model, "--phase", "decode", "--batch", "64", "--json"]
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
            seconds[f"{gpu}/{model}"] = time.perf_counter() - start
    return {
        "predict_processes": len(seconds),
        "predict_process_s_median": statistics.median(seconds.values()),
        "predict_process_s_max": max(seconds.values()),
        "predict_process_s_slowest_pair": max(seconds, key=seconds.__getitem__),
    }
