"""``festina models``: the catalogue from the command line; every bad ``add`` field is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from festina_hpc.daemon.catalogue_models import catalogue_gateway_models
from festina_hpc.db.catalogue import CatalogueEntry
from festina_hpc.profiles.store import ProfileStore
from tests.cli.conftest import Festina, with_option

SHIPPED = Path(__file__).resolve().parents[2] / "profiles"
ADD = ("models", "add", "llama8b", "--profile", "llama-3.1-8b", "--gpu-type", "h100", "--engine", "vllm",
       "--ttft-slo-s", "1.0", "--tbt-slo-s", "0.1")


@pytest.fixture
def db(tmp_path: Path, festina: Festina, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'festina.db'}"
    monkeypatch.setenv("FESTINA_DB_URL", url)
    assert festina("db", "upgrade").code == 0
    return url


def test_add_list_show_update_remove(festina: Festina, db: str) -> None:
    added = festina(*ADD, "--engine-args", "--max-model-len 8192", "--max-instances", "4", "--json")
    assert added.code == 0, added.err
    assert json.loads(added.out)["gpu_type"] == "h100-sxm-80gb"
    listed = json.loads(festina("models", "list", "--json").out)["models"]
    assert [m["name"] for m in listed] == ["llama8b"] and listed[0]["engine_args"] == "--max-model-len 8192"
    assert "instances      none running" in festina("models", "show", "llama8b").out
    updated = festina("models", "update", "llama8b", "--tbt-slo-s", "0.08", "--json")
    assert json.loads(updated.out)["tbt_slo_s"] == 0.08
    limited = festina("models", "update", "llama8b", "--max-output-tokens", "2048", "--json")
    assert json.loads(limited.out)["max_output_tokens"] == 2048
    assert "max_output_tokens 2048" in festina("models", "show", "llama8b").out
    assert festina("models", "remove", "llama8b").out.strip() == "removed llama8b"
    assert "no models in the catalogue" in festina("models", "list").out


NOT_A_DURATION = "is not a duration (seconds, or e.g. 90s, 15m, 1h30m, 2d)"


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--profile", "gpt-9", "profile = 'gpt-9' has no shipped profile on h100-sxm-80gb (shipped: codellama-34b"),
    ("--gpu-type", "tpu", "gpu_type = 'tpu' is not a known GPU type"),
    ("--engine", "tgi", "Invalid value for '--engine': 'tgi' is not one of 'vllm', 'emulated'"),
    ("--engine-args", "'open", "engine_args = \"'open\" is not valid shell words"),
    ("--engine-args", "--port 9", "engine_args = '--port 9' sets --port, which festina sets itself"),
    ("--account", "a;b", "account = 'a;b' may only hold letters"),
    ("--ttft-slo-s", "fast", f"Invalid value for '--ttft-slo-s': 'fast' {NOT_A_DURATION}"),
    ("--ttft-slo-s", "0", "ttft_slo_s = 0.0 must be positive"),
    ("--ttft-slo-s", "inf", f"Invalid value for '--ttft-slo-s': 'inf' {NOT_A_DURATION}"),
    ("--tbt-slo-s", "-1", f"Invalid value for '--tbt-slo-s': '-1' {NOT_A_DURATION}"),
    ("--tbt-slo-s", "x", f"Invalid value for '--tbt-slo-s': 'x' {NOT_A_DURATION}"),
    ("--min-instances", "1.5", "Invalid value for '--min-instances': '1.5' is not a valid integer"),
    ("--min-instances", "-1", "min_instances = -1 must be non-negative"),
    ("--max-instances", "two", "Invalid value for '--max-instances': 'two' is not a valid integer"),
    ("--max-instances", "0", "max_instances = 0 must be at least 1"),
    ("--keep-alive-s", "soon", f"Invalid value for '--keep-alive-s': 'soon' {NOT_A_DURATION}"),
    ("--keep-alive-s", "-3", f"Invalid value for '--keep-alive-s': '-3' {NOT_A_DURATION}"),
    ("--max-output-tokens", "many", "Invalid value for '--max-output-tokens': 'many' is not a valid integer"),
    ("--max-output-tokens", "0", "max_output_tokens = 0 must be between 1 and llama-3.1-8b's context length"),
])
def test_bad_add_field(festina: Festina, db: str, option: str, value: str, message: str) -> None:
    argv = with_option(ADD, option, value)
    result = festina(*argv)
    assert result.code == 2
    assert result.err.startswith("festina: error: ") and message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert json.loads(festina("models", "list", "--json").out)["models"] == []  # nothing half-done


def test_update_with_unbalanced_quotes_is_one_line_naming_the_field(festina: Festina, db: str) -> None:
    assert festina(*ADD).code == 0
    result = festina("models", "update", "llama8b", "--engine-args", "--max-model-len \"8192")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "engine_args = '--max-model-len \"8192' is not valid shell words" in result.err


def test_bad_name_and_duplicates(festina: Festina, db: str) -> None:
    bad = list(ADD)
    bad[2] = "has space"
    assert "name = 'has space'" in festina(*bad).err
    assert festina(*ADD).code == 0
    again = festina(*ADD)
    assert again.code == 2 and "already in the catalogue" in again.err
    assert "'nope' is not in the catalogue (catalogued: llama8b)" in festina("models", "show", "nope").err
    assert "nothing to update" in festina("models", "update", "llama8b").err


def test_an_unmigrated_database_is_refused(festina: Festina, tmp_path: Path) -> None:
    result = festina("models", "list", "--db-url", f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.code == 2 and "festina db upgrade" in result.err


def test_festinad_serves_the_catalogue_with_its_slos() -> None:
    profiles = ProfileStore(SHIPPED)
    entries = [CatalogueEntry("llama8b", "llama-3.1-8b", "h100-sxm-80gb", "vllm", 1.0, 0.1),
               CatalogueEntry("mistral", "mistral-7b", "a100-sxm-80gb", "vllm", 2.0, 0.2),
               CatalogueEntry("mistral-h100", "mistral-7b", "h100-sxm-80gb", "vllm", 2.0, 0.2,
                              max_output_tokens=512)]
    served = catalogue_gateway_models(entries, profiles, "h100-sxm-80gb")
    assert [m.name for m in served] == ["llama-3.1-8b", "mistral-7b"]
    assert (served[0].slo.ttft_s, served[0].slo.tbt_s) == (1.0, 0.1)
    # listed and echoed under the catalogue's name; the profile's is an alias (the gateway accepts the name)
    assert [(m.public, m.public_name) for m in served] == [("llama8b", "llama8b"), ("mistral-h100", "mistral-h100")]
    assert "llama8b" not in served[0].aliases and "meta-llama/Meta-Llama-3.1-8B-Instruct" in served[0].aliases
    # the output limit: the catalogue's, else the context length; the context bounds prompt plus output
    context = {m.name: profiles.model(m.name).max_context_tokens for m in served}
    assert [(m.max_output_tokens, m.context_tokens) for m in served] == [
        (context["llama-3.1-8b"], context["llama-3.1-8b"]), (512, context["mistral-7b"])]
