"""``festina sim run`` and its input errors, on the shipped profiles and small traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.conftest import Festina

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def write_trace(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def test_run_writes_result_and_resolved_config(festina: Festina, tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", [f"{i * 0.5},{200 + i},{20 + i}" for i in range(40)])
    out = tmp_path / "out"
    result = festina("sim", "run", "--policy", "vllm", "--trace", str(trace), "--models", "2", "--out", str(out))
    assert result.code == 0, result.err
    data = json.loads((out / "result.json").read_text())
    for key in ("policy", "energy_j", "energy_per_token_j", "requests_total", "requests_completed",
                "requests_dropped", "slo_attainment", "ttft_attainment", "tbt_attainment", "ttft_p50_s",
                "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "gpu_hours_powered", "node_hours_powered", "migrations",
                "cold_starts", "sim_wall_s"):
        assert key in data, key
    assert data["requests_total"] == data["requests_completed"] + data["requests_dropped"] == 40
    config = json.loads((out / "config.json").read_text())
    assert config["models"] == ["llama-3.1-8b", "mistral-7b"] and config["seed"] == 0
    assert config["cluster"]["gpus_per_node"] == 8 and "llama-3.1-8b" in config["slos"]


@pytest.mark.parametrize(("case", "rows", "header", "message"), [
    ("missing column", ["0,10"], "TIMESTAMP,ContextTokens", "missing column GeneratedTokens"),
    ("unsorted", ["1.0,10,5", "0.5,10,5"], HEADER, "line 3"),
    ("negative time", ["-1.0,10,5"], HEADER, "line 2"),
    ("non-numeric tokens", ["0.0,ten,5"], HEADER, "line 2"),
    ("empty", [], HEADER, "no requests"),
])
def test_bad_trace_is_a_one_line_error_naming_the_line(festina: Festina, tmp_path: Path, case: str,
                                                       rows: list[str], header: str, message: str) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    result = festina("sim", "run", "--policy", "vllm", "--trace", str(trace), "--out", str(tmp_path / "o"))
    assert result.code == 2, case
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("festina: error: ") and str(trace) in lines[0], result.err
    assert message in lines[0], (case, lines[0])
    assert not (tmp_path / "o" / "result.json").exists()


def test_unknown_policy_lists_the_known_ones(festina: Festina, tmp_path: Path) -> None:
    result = festina("sim", "run", "--policy", "nope", "--trace", "azure-conv", "--out", str(tmp_path))
    assert result.code == 2
    assert "unknown policy 'nope' (known: dynamollm, festina, festina-control, festina-placement, llumnix, " \
           "muxserve, serverlessllm, vllm" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_compare_names_the_best_baseline_by_the_slo_target(festina: Festina, tmp_path: Path) -> None:
    """vllm is the only baseline: it is the best one at a target of 0 and none at a target above 1 - its misses."""
    runs = {}
    for target in ("0", "1"):
        out = tmp_path / target
        result = festina("sim", "compare", "--policies", "vllm,festina", "--trace", "azure-conv", "--models", "2",
                         "--nodes", "1", "--duration-s", "60", "--slo-target", target, "--out", str(out))
        assert result.code == 0, result.err
        # Progress on stderr (plain lines: not a terminal); stdout only the results.
        assert "festina sim compare: simulating started (2 policies)\n" in result.err
        assert "festina sim compare: simulating done: 2/2 policies (100%)" in result.err
        assert "simulating" not in result.out
        runs[target] = json.loads((out / "comparison.json").read_text())
    easy, hard = runs["0"], runs["1"]
    assert easy["slo_target"] == 0.0 and easy["best_baseline"] == "vllm"
    assert [r["policy"] for r in easy["results"]] == ["vllm", "festina"]
    festina_j, vllm_j = (r["energy_j"] for r in reversed(easy["results"]))
    assert easy["festina_vs_best_baseline"] == pytest.approx(festina_j / vllm_j)
    assert all(r["x_bound"] >= 1.0 for r in easy["results"])
    vllm = hard["results"][0]
    assert (hard["best_baseline"] is None) == (vllm["slo_attainment"] < 1.0)
    if hard["best_baseline"] is None:
        assert hard["festina_vs_best_baseline"] is None
        assert "Best baseline at equal SLO: **none**" in (tmp_path / "1" / "comparison.md").read_text()


def test_sweep_runs_every_policy_on_every_rate_and_seed_in_worker_processes(festina: Festina, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = festina("sim", "sweep", "--policies", "vllm,festina", "--trace", "azure-conv", "--models", "2",
                     "--nodes", "1", "--duration-s", "120", "--rate-scales", "1,2", "--seeds", "0,3", "--jobs", "2",
                     "--out", str(out))
    assert result.code == 0, result.err
    data = json.loads((out / "sweep.json").read_text())
    cells = {(p["rate_scale"], p["seed"], p["policy"]) for p in data["points"]}
    assert cells == {(s, seed, p) for s in (1.0, 2.0) for seed in (0, 3) for p in ("vllm", "festina")}
    bounds = {(b["rate_scale"], b["seed"]): b["energy_j"] for b in data["bounds_j"]}
    assert all(0 < bounds[p["rate_scale"], p["seed"]] <= p["energy_j"] for p in data["points"])
    vllm = [s for s in data["summary"] if s["policy"] == "vllm"]
    assert [s["x_reference_mean"] for s in vllm] == [1.0, 1.0]
    assert data["workload"]["models"] == ["llama-3.1-8b", "mistral-7b"] and "seed" not in data["workload"]
    assert (out / "sweep.png").stat().st_size > 0 and "# Load sweep" in (out / "sweep.md").read_text()
    assert "Operating rate scale" in result.out or "no operating point" in result.out
    # Progress on stderr, a line per phase start and end when stderr is not a terminal.
    assert "festina sim sweep: simulating started (12 runs)\n" in result.err
    assert "festina sim sweep: simulating done: 12/12 runs (100%)" in result.err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--rate-scales", "0,1", "'--rate-scales': 0 must be above 0"),
    ("--rate-scales", "1,fast", "'--rate-scales': 'fast' is not a number"),
    ("--seeds", "1,1", "'--seeds': '1,1' repeats a value"),
    ("--reference", "dynamollm", "'--reference': 'dynamollm' is not among --policies"),
])
def test_sweep_bad_input_is_a_one_line_error_naming_the_option(festina: Festina, tmp_path: Path, option: str,
                                                               value: str, message: str) -> None:
    result = festina("sim", "sweep", "--policies", "vllm,festina", "--trace", "azure-conv", option, value,
                     "--out", str(tmp_path / "o"))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [
    ("run", "--policy", "vllm"), ("compare", "--policies", "vllm"), ("bound",),
    ("sweep", "--policies", "vllm", "--rate-scales", "1", "--seeds", "0", "--jobs", "1"),
])
@pytest.mark.parametrize("mode", ["none", "slurm"])
def test_cli_power_saving_overrides_the_config(festina: Festina, tmp_path: Path, command: tuple[str, ...],
                                               mode: str) -> None:
    """Every sim command takes --power-saving over [cluster] power_saving (the config says the other)."""
    config = tmp_path / "festina.toml"
    config.write_text(f'[cluster]\npower_saving = "{"slurm" if mode == "none" else "none"}"\n', encoding="utf-8")
    out = tmp_path / "out"
    result = festina("--config", str(config), "sim", *command, "--trace", "azure-code", "--models", "2",
                     "--duration-s", "20", "--power-saving", mode, "--out", str(out))
    assert result.code == 0, result.err
    if command[0] == "sweep":
        resolved = json.loads((out / "sweep.json").read_text())["workload"]
    else:
        resolved = json.loads((out / "config.json").read_text())
    assert resolved["cluster"]["power_saving"] == mode


def test_cli_refuses_an_unknown_power_saving_mode(festina: Festina, tmp_path: Path) -> None:
    result = festina("sim", "run", "--policy", "vllm", "--trace", "azure-code", "--power-saving", "always",
                     "--out", str(tmp_path))
    assert result.code == 2 and "--power-saving" in result.err
