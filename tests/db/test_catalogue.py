"""festina_hpc.db.catalogue on SQLite and PostgreSQL: validation names the field, nothing half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from festina_hpc.db.catalogue import Catalogue, CatalogueEntry, CatalogueError
from festina_hpc.db.store import Store
from festina_hpc.policy.types import InstancePhase
from festina_hpc.profiles.store import ProfileStore
from tests.db.conftest import T0, make_cluster

SHIPPED = Path(__file__).resolve().parents[2] / "profiles"


@pytest.fixture(scope="module")
def profiles() -> ProfileStore:
    return ProfileStore(SHIPPED)


@pytest.fixture
def catalogue(migrated: Engine, profiles: ProfileStore) -> Catalogue:
    return Catalogue(migrated, profiles)


def entry(**overrides: Any) -> CatalogueEntry:
    fields: dict[str, Any] = dict(name="llama8b", profile="llama-3.1-8b", gpu_type="h100", engine="vllm",
                                  ttft_slo_s=1.0, tbt_slo_s=0.1)
    fields.update(overrides)
    return CatalogueEntry(**fields)


def test_add_canonicalises_and_lists(catalogue: Catalogue) -> None:
    stored = catalogue.add(entry(profile="Meta-Llama-3.1-8B-Instruct", max_instances=4, keep_alive_s=30.0))
    assert (stored.profile, stored.gpu_type) == ("llama-3.1-8b", "h100-sxm-80gb")
    catalogue.add(entry(name="mistral", profile="mistral-7b", engine="emulated"))
    assert [e.name for e in catalogue.list()] == ["llama8b", "mistral"]
    assert catalogue.get("llama8b") == stored


@pytest.mark.parametrize(("case", "overrides", "message"), [
    ("empty name", {"name": ""}, "name = ''"),
    ("name with space", {"name": "a b"}, "name = 'a b'"),
    ("unknown profile", {"profile": "gpt-9"}, "profile = 'gpt-9' has no shipped profile on h100-sxm-80gb "
                                              "(shipped: codellama-34b,"),
    ("unknown gpu", {"gpu_type": "tpu"}, "gpu_type = 'tpu' is not a known GPU type"),
    ("engine", {"engine": "tgi"}, "engine = 'tgi' must be one of vllm, emulated"),
    ("engine args", {"engine_args": "'unclosed"}, "engine_args = \"'unclosed\" is not valid shell words"),
    ("ttft zero", {"ttft_slo_s": 0.0}, "ttft_slo_s = 0.0 must be positive"),
    ("ttft text", {"ttft_slo_s": "1"}, "ttft_slo_s = '1' is not a finite number"),
    ("ttft nan", {"ttft_slo_s": float("nan")}, "ttft_slo_s = nan is not a finite number"),
    ("tbt negative", {"tbt_slo_s": -0.1}, "tbt_slo_s = -0.1 must be positive"),
    ("min negative", {"min_instances": -1}, "min_instances = -1 must be non-negative"),
    ("min float", {"min_instances": 1.5}, "min_instances = 1.5 is not an integer"),
    ("max below min", {"min_instances": 3, "max_instances": 2}, "max_instances = 2 must be at least 1"),
    ("max zero", {"max_instances": 0}, "max_instances = 0 must be at least 1"),
    ("keep alive negative", {"keep_alive_s": -5.0}, "keep_alive_s = -5.0 must be non-negative"),
    ("output limit zero", {"max_output_tokens": 0}, "max_output_tokens = 0 must be between 1 and llama-3.1-8b's "
                                                     "context length (131072)"),
    ("output limit above the context", {"max_output_tokens": 131073}, "max_output_tokens = 131073 must be between"),
    ("output limit float", {"max_output_tokens": 8.5}, "max_output_tokens = 8.5 is not an integer"),
    ("account not text", {"account": 7}, "account = 7 is not text"),
    ("account with space", {"account": "ml team"}, "account = 'ml team' may only hold letters, digits and _ . -"),
    ("engine args set the port", {"engine_args": "--port=9 --max-model-len 8192"},
     "engine_args = '--port=9 --max-model-len 8192' sets --port, which festina sets itself"),
    ("engine args set the batch cap", {"engine_args": "--max_num_seqs 8"}, "sets --max-num-seqs"),
    ("emulated engine args it does not take", {"engine": "emulated", "engine_args": "--max-model-len 8192"},
     "has flags the emulated engine does not take (--max-model-len; it takes --chunk-tokens, --drain-s)"),
])
def test_bad_entries_are_refused_naming_the_field(catalogue: Catalogue, case: str, overrides: dict[str, Any],
                                                  message: str) -> None:
    with pytest.raises(CatalogueError, match=None) as info:
        catalogue.add(entry(**overrides))
    assert message in str(info.value), case
    assert catalogue.list() == []  # nothing half-written


def test_duplicates_are_refused(catalogue: Catalogue) -> None:
    catalogue.add(entry())
    with pytest.raises(CatalogueError, match="already in the catalogue"):
        catalogue.add(entry())
    with pytest.raises(CatalogueError, match="already served on h100-sxm-80gb as 'llama8b'"):
        catalogue.add(entry(name="other"))


def test_update_validates_the_whole_entry(catalogue: Catalogue) -> None:
    catalogue.add(entry())
    assert catalogue.update("llama8b", tbt_slo_s=0.08).tbt_slo_s == 0.08
    assert catalogue.get("llama8b").max_output_tokens is None  # the context length, not stored
    assert catalogue.update("llama8b", max_output_tokens=4096).max_output_tokens == 4096
    assert catalogue.get("llama8b").max_output_tokens == 4096
    with pytest.raises(CatalogueError, match="ttft_slo_s = -1"):
        catalogue.update("llama8b", ttft_slo_s=-1.0)
    assert catalogue.get("llama8b").ttft_slo_s == 1.0
    with pytest.raises(CatalogueError, match="'nope' is not in the catalogue"):
        catalogue.update("nope", tbt_slo_s=0.1)


def test_remove_is_refused_while_instances_run(catalogue: Catalogue, migrated: Engine) -> None:
    store = Store(migrated)
    gpus = make_cluster(store)
    catalogue.add(entry())
    instance = store.create_instance("llama-3.1-8b", [gpus[("n01", 0)]], at=T0, sm_pct=50.0, batch_cap=64,
                                     memory_fraction=0.3)
    assert catalogue.running_instances("llama8b") == [instance]
    with pytest.raises(CatalogueError, match=r"1 instance\(s\) running .*--drain"):
        catalogue.remove("llama8b")
    store.set_phase(instance, InstancePhase.STOPPED, at=T0)
    assert catalogue.remove("llama8b").name == "llama8b"
    assert catalogue.list() == []
