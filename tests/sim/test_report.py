"""Comparison reports: the markdown tables, comparison.json and the three plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import pytest

from festina_hpc.sim.bound import Bound
from festina_hpc.sim.report import comparison_json, comparison_markdown, write_comparison, write_plots
from festina_hpc.sim.simulator import ENERGY_PARTS, SimResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(policy: str, *, active_j: float = 2.0e6, idle_j: float = 1.0e6, static_j: float = 1.5e6,
                cold_j: float = 1.0e4, migration_j: float = 0.0, **overrides: Any) -> SimResult:
    parts = {"gpu_active_j": active_j, "gpu_idle_j": idle_j, "cold_start_j": cold_j, "migration_j": migration_j,
             "node_static_j": static_j}
    values: dict[str, Any] = dict(
        policy=policy, energy_j=sum(parts.values()), energy_parts_j=parts, generated_tokens=1_000_000,
        requests_total=5000, requests_completed=5000, requests_dropped=0, slo_attainment=0.99,
        ttft_attainment=0.995, tbt_attainment=0.995, ttft_p50_s=0.05, ttft_p99_s=0.4, tbt_p50_s=0.02,
        tbt_p99_s=0.035, gpu_hours_powered=8.0, node_hours_powered=1.0, migrations=0, request_migrations=0,
        cold_starts=4,
        invalid_decisions=0, sim_time_s=3600.0, sim_wall_s=1.0, events=1000,
        power_timeline=[(10.0 * k, 1500.0 + 100.0 * (k % 7)) for k in range(1, 361)])
    values.update(overrides)
    return SimResult(**values)


def make_bound(energy_j: float = 2.0e6) -> Bound:
    parts = {"gpu_active_j": 0.1 * energy_j, "gpu_idle_j": 0.4 * energy_j, "cold_start_j": 0.0, "migration_j": 0.0,
             "node_static_j": 0.5 * energy_j}
    terms = {"tokens": 0.1 * energy_j, "standby": 0.0, "in_flight": 0.5 * energy_j, "loaded_models": 0.1 * energy_j,
             "wake_time": 0.3 * energy_j}
    return Bound(energy_j=energy_j, energy_parts_j=parts, requests_total=5000, generated_tokens=1_000_000,
                 horizon_s=3600.0, in_flight_s=3500.0, node_hours_powered=0.97, gpu_hours_powered=7.8,
                 terms_j=terms)


RESULTS = [
    make_result("vllm"),
    make_result("muxserve", active_j=1.5e6, migrations=3),
    make_result("festina", active_j=1.5e6, idle_j=0.4e6, static_j=0.6e6, slo_attainment=0.991, migrations=12),
]


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` (or of the first table when heading is empty)."""
    lines = markdown.splitlines()
    start = lines.index(heading) if heading else 0
    rows: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # without header and rule


def test_markdown_has_a_row_per_policy_and_the_bound() -> None:
    md = comparison_markdown(RESULTS, make_bound())
    rows = table_rows(md, "")
    assert [r[0] for r in rows] == ["vllm", "muxserve", "festina", "*lower bound*"]
    header = next(line for line in md.splitlines() if line.startswith("| policy"))
    for column in ("energy kWh", "GPU kWh", "J/token", "x muxserve", "x bound", "SLO att.", "meets 99.0%",
                   "TTFT att.", "TBT att."):
        assert f" {column} " in header
    festina = rows[2]
    assert festina[1] == f"{RESULTS[2].energy_j / 3.6e6:.3f}"
    assert festina[2] == f"{RESULTS[2].gpu_energy_j / 3.6e6:.3f}"
    assert festina[4] == f"{RESULTS[2].energy_j / RESULTS[1].energy_j:.2f}"  # vs muxserve, the best baseline
    assert festina[5] == f"{RESULTS[2].energy_j / 2.0e6:.2f}"
    assert festina[6:8] == ["99.1%", "yes"]


def test_operations_table_counts_restarts_and_clock_changes() -> None:
    results = [make_result("vllm"), make_result("festina", share_restarts=7, clock_changes=120)]
    md = comparison_markdown(results, make_bound())
    header = next(line for line in md.splitlines()[md.splitlines().index("## Latency and operations"):]
                  if line.startswith("| policy"))
    for column in ("TTFT p50 s", "TTFT p99 s", "TBT p50 ms", "TBT p99 ms", "GPU-h", "node-h", "cold starts",
                   "migrations", "requests moved", "share restarts", "clock changes", "dropped"):
        assert f" {column} " in header
    rows = {r[0]: r for r in table_rows(md, "## Latency and operations")}
    assert rows["festina"][10:12] == ["7", "120"]
    assert rows["*lower bound*"][6] == "0.97"


def test_split_table_shows_every_part_per_policy() -> None:
    md = comparison_markdown(RESULTS, make_bound())
    assert "## Energy split" in md
    rows = table_rows(md, "## Energy split")
    assert [r[0] for r in rows] == ["vllm", "muxserve", "festina", "*lower bound*"]
    vllm = rows[0]
    assert vllm[1] == f"{2.0e6 / 3.6e6:.3f} ({2.0e6 / RESULTS[0].energy_j:.0%})"
    assert len(vllm) == 9  # policy, seven parts, total
    split = next(line for line in md.splitlines()[md.splitlines().index("## Energy split"):]
                 if line.startswith("| policy"))
    for part in ("GPU active", "GPU idle", "node static", "standby", "cold start", "migration", "share restart"):
        assert f" {part} " in split
    standby = make_result("vllm", energy_j=RESULTS[0].energy_j + 3.6e5,
                          energy_parts_j={**RESULTS[0].energy_parts_j, "standby_j": 3.6e5})
    assert table_rows(comparison_markdown([standby], None), "## Energy split")[0][4].startswith("0.100 (")


def test_difference_table_names_the_part_a_saving_comes_from() -> None:
    md = comparison_markdown(RESULTS, None)
    rows = {r[0]: r for r in table_rows(md, "## Difference from muxserve by part")}
    assert "muxserve" not in rows
    assert rows["vllm"][-1] == "GPU active (100%)"
    assert rows["festina"][-1].startswith("node static")  # -0.9 MJ of -1.5 MJ
    assert rows["festina"][1] == "+0.000"


def test_best_baseline_ignores_festina_variants() -> None:
    md = comparison_markdown([make_result("festina", active_j=1.0), make_result("festina-placement", active_j=1.0),
                              make_result("vllm")], None)
    assert "Best baseline at equal SLO: **vllm**" in md


def test_best_baseline_is_the_cheapest_that_meets_the_slo_target() -> None:
    """muxserve spends less than vllm but misses 0.99: it is named, and vllm is the one compared against."""
    results = [make_result("vllm"), make_result("muxserve", active_j=1.0e6, slo_attainment=0.95),
               make_result("festina", active_j=1.5e6)]
    md = comparison_markdown(results, None)
    assert "Best baseline at equal SLO: **vllm**" in md
    assert "missed the target (not compared against): muxserve (95.0% SLO" in md
    assert table_rows(md, "")[2][4] == f"{results[2].energy_j / results[0].energy_j:.2f}"
    data = comparison_json(results, None)
    assert (data["slo_target"], data["best_baseline"]) == (0.99, "vllm")
    assert data["festina_vs_best_baseline"] == pytest.approx(results[2].energy_j / results[0].energy_j)
    assert data["cheaper_baselines_below_target"] == ["muxserve"]
    assert [r["meets_slo_target"] for r in data["results"]] == [True, False, True]
    # A lower target lets muxserve in.
    assert comparison_json(results, None, slo_target=0.9)["best_baseline"] == "muxserve"


def test_no_best_baseline_when_none_meets_the_target() -> None:
    results = [make_result("vllm", slo_attainment=0.97), make_result("festina", slo_attainment=0.999)]
    md = comparison_markdown(results, make_bound())
    assert "Best baseline at equal SLO: **none**" in md
    assert "## Difference from" not in md
    assert table_rows(md, "")[1][4] == "-"
    data = comparison_json(results, make_bound())
    assert data["best_baseline"] is None and data["festina_vs_best_baseline"] is None
    assert data["results"][1]["x_best_baseline"] is None
    assert data["results"][1]["x_bound"] == pytest.approx(results[1].energy_j / 2.0e6)


def test_markdown_copes_with_a_policy_that_completed_nothing() -> None:
    nothing = make_result("dropper", requests_completed=0, requests_dropped=5000, generated_tokens=0,
                          slo_attainment=0.0, ttft_attainment=0.0, tbt_attainment=0.0, ttft_p50_s=math.nan,
                          ttft_p99_s=math.nan, tbt_p50_s=math.nan, tbt_p99_s=math.nan)
    md = comparison_markdown([nothing], None)
    assert table_rows(md, "")[0][3] == "-"  # J/token of no token
    row = table_rows(md, "## Latency and operations")[0]
    assert row[1:5] == ["-", "-", "-", "-"]
    assert row[-1] == "5000"


def test_write_comparison_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    bound = make_bound()
    written = write_comparison(RESULTS, bound, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["bound.json", "comparison.json", "comparison.md", "energy.png", "power.png", "slo.png"]
    loaded = json.loads((tmp_path / "out" / "comparison.json").read_text(encoding="utf-8"))
    assert loaded["best_baseline"] == "muxserve"
    assert loaded["festina_vs_best_baseline"] == pytest.approx(RESULTS[2].energy_j / RESULTS[1].energy_j)
    assert loaded["bound_energy_j"] == bound.energy_j
    rows = loaded["results"]
    assert [row["policy"] for row in rows] == [r.policy for r in RESULTS]
    for row, r in zip(rows, RESULTS):
        assert row["gpu_energy_j"] == pytest.approx(r.gpu_energy_j)
        assert row["energy_per_token_j"] == pytest.approx(r.energy_per_token_j)
        assert set(row["energy_parts_j"]) == set(ENERGY_PARTS)  # older results' missing parts read as 0
        assert sum(row["energy_parts_j"].values()) == pytest.approx(r.energy_j)
        for key in ("node_hours_powered", "share_restarts", "clock_changes"):
            assert row[key] == getattr(r, key)
    derived = ("energy_per_token_j", "gpu_energy_j", "meets_slo_target", "x_best_baseline", "x_bound")
    assert [SimResult(**{k: v for k, v in d.items() if k not in derived}).energy_j for d in rows] == [
        r.energy_j for r in RESULTS]
    assert json.loads((tmp_path / "out" / "bound.json").read_text(encoding="utf-8"))["energy_j"] == bound.energy_j
    assert (tmp_path / "out" / "comparison.md").read_text(encoding="utf-8") == comparison_markdown(RESULTS, bound)


def test_plots_are_pngs_and_leave_pyplot_alone(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    figures = plt.get_fignums()
    paths = write_plots(RESULTS, tmp_path, make_bound())
    assert [p.name for p in paths] == ["energy.png", "power.png", "slo.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000  # drawn, not an empty canvas
    assert plt.get_fignums() == figures
    assert matplotlib.get_backend() == backend


@pytest.mark.parametrize("results", [[], [make_result("vllm", power_timeline=[])]], ids=["none", "no timeline"])
def test_plots_cope_with_nothing_to_draw(tmp_path: Path, results: list[SimResult]) -> None:
    for path in write_plots(results, tmp_path):
        assert path.read_bytes().startswith(PNG_MAGIC)
