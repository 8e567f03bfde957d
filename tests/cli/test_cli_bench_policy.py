"""``festina bench policy``: the shape of its figures on small clusters, not their speed."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import Festina


def test_bench_policy_json_prints_one_object_per_size(festina: Festina) -> None:
    result = festina("bench", "policy", "--gpus", "16,64", "--decisions", "200", "--json")
    assert (result.code, result.err) == (0, "")
    figures = json.loads(result.out)
    assert set(figures) == {"placement", "control_tick_ms", "consolidate"}
    assert [row["gpus"] for row in figures["placement"]] == [16, 64]
    for row in figures["placement"]:
        assert set(row) == {"gpus", "decisions_per_s", "p50_us", "p99_us"}
        assert row["decisions_per_s"] > 0 and 0 < row["p50_us"] <= row["p99_us"]
    assert isinstance(figures["control_tick_ms"], float) and figures["control_tick_ms"] > 0
    assert [row["gpus"] for row in figures["consolidate"]] == [16, 64]
    for row in figures["consolidate"]:
        assert set(row) == {"gpus", "plan_s"} and row["plan_s"] >= 0


def test_bench_policy_table_for_a_baseline(festina: Festina) -> None:
    result = festina("bench", "policy", "--policy", "vllm", "--gpus", "8", "--decisions", "50")
    assert result.code == 0, result.err
    assert all(word in result.out for word in ("vllm", "decisions/s", "local control at 8 GPUs"))


@pytest.mark.parametrize("gpus", ["12", "0", "64,x", ""])
def test_bench_policy_refuses_sizes_that_are_not_whole_nodes(festina: Festina, gpus: str) -> None:
    result = festina("bench", "policy", "--gpus", gpus, "--decisions", "10")
    assert result.code == 2
    assert "--gpus" in result.err
