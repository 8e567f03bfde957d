from __future__ import annotations

import json
from pathlib import Path

import pytest

from festina_hpc.cli.main import main
from festina_hpc.profiles.table import ProfileTable

GRID = ["--clocks", "900,1980", "--batches", "1,64", "--contexts", "512,2048", "--sm-pcts", "50,100"]


@pytest.fixture
def config_file(synthetic_profiles_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "festina.toml"
    path.write_text(f'[profiles]\ndir = "{synthetic_profiles_dir}"\n\n[gpu]\nbackend = "nvml"\n'
                    'simulated_type = "h100"\nsimulated_count = 2\n', encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_backend_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FESTINA_GPU_BACKEND", raising=False)


def test_measure_on_the_simulated_backend_writes_a_table_and_prints_json(
        config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "llama.csv"
    rc = main(["--config", str(config_file), "profiles", "measure", "--gpu-index", "1", "--model", "llama3.1-8b",
               "--backend", "simulated", *GRID, "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["points"] == 32
    assert (summary["gpu"], summary["model"], summary["tp"], summary["gpu_index"]) == (
        "h100-sxm-80gb", "llama-3.1-8b", 1, 1)
    assert summary["backend"] == "SimulatedGpuBackend (backend simulated)"
    assert summary["measured_s"] > 0 and summary["out"] == str(out)
    table = ProfileTable.from_csv(out)
    assert table.axes[3] == (900.0, 1980.0)
    assert any(note.startswith("date: ") for note in table.notes)
    assert any(note.startswith("command: festina profiles measure --gpu-index 1 --model llama-3.1-8b --backend "
                               "simulated --clocks 900,1980") for note in table.notes)


def test_the_environment_picks_the_backend_and_the_summary_is_one_line(
        config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FESTINA_GPU_BACKEND", "simulated")
    out = tmp_path / "llama.csv"
    assert main(["--config", str(config_file), "profiles", "measure", "--model", "llama-3.1-8b", *GRID,
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("measured 32 points of llama-3.1-8b on h100-sxm-80gb (GPU 0, SimulatedGpuBackend")
    assert out.is_file()


@pytest.mark.parametrize("case,args,env,message", [
    ("bad env backend", [], "bogus", "festina: error: gpu backend = 'bogus' is not one of auto, nvml, simulated"),
    ("zero batch", ["--batches", "0,8"], None,
     "festina: error: Invalid value for '--batches': '0,8' must list positive numbers"),
    ("no such gpu", ["--gpu-index", "7"], None, "GPU 7 does not exist (this node has 2)"),
    ("not a list", ["--contexts", "512,lots"], None, "'512,lots' is not a comma-separated list of ints"),
    ("no table", ["--model", "mistral-7b"], None, "festina: error: no profile for model mistral-7b on gpu h100"),
])
def test_measure_errors_are_one_line_and_write_nothing(
        config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        case: str, args: list[str], env: str | None, message: str) -> None:
    if env is not None:
        monkeypatch.setenv("FESTINA_GPU_BACKEND", env)
    else:
        args = [*args, "--backend", "simulated"]
    out = tmp_path / "llama.csv"
    rc = main(["--config", str(config_file), "profiles", "measure", "--model", "llama-3.1-8b", *GRID, *args,
               "--out", str(out)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
