"""``festina profiles list`` and ``festina profiles predict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from festina_hpc.profiles.store import ProfileStore
from tests.cli.conftest import Festina
from tests.conftest import write_config


def test_predict_json_prints_one_object_with_inputs_and_answers(festina: Festina, config_path: Path,
                                                               profiles_dir: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "predict", "--gpu", "h100", "--model", "llama-3.1-8b",
                     "--phase", "decode", "--batch", "64", "--json")
    assert (result.code, result.err) == (0, "")
    answer = json.loads(result.out)
    assert {"gpu": "h100-sxm-80gb", "model": "llama-3.1-8b", "tp": 1, "phase": "decode", "batch": 64,
            "context_tokens": 1024, "sm_pct": 100.0, "clock_mhz": 1980, "clamped": False}.items() <= answer.items()
    expected = ProfileStore(profiles_dir).predict("h100", "llama-3.1-8b", "decode", 64, 1024).as_dict()
    assert answer == expected
    assert answer["latency_s"] > 0 and answer["power_w"] > 0 and answer["energy_per_token_j"] > 0


def test_predict_passes_every_option_through(festina: Festina, config_path: Path, profiles_dir: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "predict", "--gpu", "H100", "--model", "llama3.1-70b",
                     "--phase", "prefill", "--batch", "3", "--context", "2000", "--sm-pct", "40",
                     "--clock-mhz", "1200", "--json")
    assert result.code == 0, result.err
    expected = ProfileStore(profiles_dir).predict("h100", "llama-3.1-70b", "prefill", 3, 2000, 40.0, 1200)
    assert json.loads(result.out) == expected.as_dict()


def test_predict_without_json_prints_a_table(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "predict", "--gpu", "h100", "--model", "llama-3.1-8b",
                     "--phase", "prefill", "--batch", "8")
    assert result.code == 0, result.err
    # rich wraps a title to its table's width, so look for the words, not the line.
    assert all(word in result.out for word in ("llama-3.1-8b", "h100-sxm-80gb", "(tp=1)", "energy_per_token_j"))


@pytest.mark.parametrize(("case", "args", "expected"), [
    ("unknown model", ["--model", "gpt-5", "--batch", "8"], "unknown model 'gpt-5' (known: codellama-34b, "),
    ("unknown gpu", ["--gpu", "b200", "--batch", "8"], "unknown gpu 'b200' (known: "),
    ("no table", ["--model", "mistral-7b", "--batch", "8"], "no profile for model mistral-7b on gpu h100-sxm-80gb"),
    ("outside the table", ["--batch", "512"], "batch = 512 is outside the profile of llama-3.1-8b on h100-sxm-80gb"),
])
def test_predict_errors_exit_2_with_one_error_line(festina: Festina, config_path: Path, case: str,
                                                   args: list[str], expected: str) -> None:
    defaults = {"--gpu": "h100", "--model": "llama-3.1-8b", "--phase": "decode"}
    given = dict(zip(args[::2], args[1::2]))
    argv = [item for pair in ({**defaults, **given}).items() for item in pair]
    result = festina("--config", str(config_path), "profiles", "predict", *argv, "--json")
    assert (result.code, result.out) == (2, ""), case
    assert result.err.startswith(f"festina: error: {expected}"), (case, result.err)
    assert result.err.count("\n") == 1, result.err


def test_predict_clamp_flag_answers_at_the_edge(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "predict", "--gpu", "h100", "--model", "llama-3.1-8b",
                     "--phase", "decode", "--batch", "512", "--clamp", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["clamped"] is True


def test_config_out_of_range_clamp_is_the_default(festina: Festina, tmp_path: Path, profiles_dir: Path) -> None:
    path = write_config(tmp_path / "clamp.toml", f'[profiles]\ndir = "{profiles_dir}"\nout_of_range = "clamp"\n')
    result = festina("--config", str(path), "profiles", "predict", "--gpu", "h100", "--model", "llama-3.1-8b",
                     "--phase", "decode", "--batch", "512", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["clamped"] is True


def test_predict_rejects_a_bad_option_value_as_usage_error(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "predict", "--gpu", "h100", "--model", "llama-3.1-8b",
                     "--phase", "train", "--batch", "8")
    assert result.code == 2
    assert "Invalid value for '--phase'" in result.err


def test_list_json_shows_the_tables_present(festina: Festina, config_path: Path, profiles_dir: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "list", "--json")
    assert (result.code, result.err) == (0, "")
    listing = json.loads(result.out)
    assert listing["profiles_dir"] == str(profiles_dir)
    assert listing["profiles"] == [
        {"gpu": "h100-sxm-80gb", "model": "llama-3.1-70b", "tp": 4,
         "weights_gib_per_gpu": round(70.55e9 * 2 / 4 / 2**30, 2), "kv_kib_per_token": 320.0,
         "max_clock_mhz": 1980, "idle_w": 70.0, "tdp_w": 700.0},
        {"gpu": "h100-sxm-80gb", "model": "llama-3.1-8b", "tp": 1,
         "weights_gib_per_gpu": round(8.03e9 * 2 / 2**30, 2), "kv_kib_per_token": 128.0,
         "max_clock_mhz": 1980, "idle_w": 70.0, "tdp_w": 700.0},
    ]


def test_list_without_json_prints_a_table(festina: Festina, config_path: Path) -> None:
    result = festina("--config", str(config_path), "profiles", "list")
    assert result.code == 0, result.err
    assert "llama-3.1-70b" in result.out and "llama-3.1-8b" in result.out
