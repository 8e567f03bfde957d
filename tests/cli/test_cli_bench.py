"""``festina bench profiles``: its figures, not its speed."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import Festina


def test_bench_profiles_json_prints_one_object_of_figures(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "bench", "profiles", "--json", "--queries", "2000")
    assert (result.code, result.err) == (0, "")
    figures = json.loads(result.out)
    assert {"gpu": "h100-sxm-80gb", "model": "llama-3.1-8b", "queries_vectorised": 2000,
            "queries_single": 2000}.items() <= figures.items()
    for key in ("lookups_per_s_vectorised", "lookups_per_s_single", "seconds_vectorised", "seconds_single",
                "table_load_s"):
        assert figures[key] > 0, key


def test_bench_profiles_on_another_table_without_json(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "bench", "profiles", "--model", "llama3.1-70b",
                     "--queries", "1000")
    assert result.code == 0, result.err
    # rich wraps a title to its table's width, so look for the words, not the line.
    assert all(word in result.out for word in ("llama-3.1-70b", "h100-sxm-80gb", "vectorised", "table load:"))


def test_bench_profiles_refuses_too_few_queries(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "bench", "profiles", "--queries", "10")
    assert result.code == 2
    assert "--queries" in result.err
