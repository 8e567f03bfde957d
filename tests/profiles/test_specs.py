"""festina_hpc.profiles.specs: the shipped GPU/model facts, name resolution and file validation."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from festina_hpc.errors import ProfileError, UnknownProfileError
from festina_hpc.profiles.specs import Catalog
from tests.conftest import REPO_PROFILES, shipped_catalog, write_profiles_dir


def specs_dir(tmp_path: Path, file: str | None = None, text: str = "") -> Path:
    """A profiles folder with the shipped specs, the text of ``file`` (if given) replaced by ``text``."""
    folder = write_profiles_dir(tmp_path, [])
    if file is not None:
        (folder / file).write_text(text, encoding="utf-8")
    return folder


def edit_shipped(name: str, old: str, new: str) -> str:
    text = (REPO_PROFILES / name).read_text(encoding="utf-8")
    assert text.count(old) >= 1, old
    return text.replace(old, new, 1)


def test_shipped_specs_load_with_every_entry() -> None:
    catalog = shipped_catalog()
    assert set(catalog.gpus) == {"h100-sxm-80gb", "a100-sxm-80gb", "a100-sxm-40gb"}
    assert set(catalog.models) == {"mistral-7b", "llama-3.1-8b", "mistral-nemo-12b", "llama-2-13b",
                                   "codellama-34b", "llama-3.1-70b", "llama-2-70b", "llama-2-7b"}
    for model in catalog.models.values():
        assert set(model.tp) == set(catalog.gpus), model.name


@pytest.mark.parametrize(("case", "kind", "name", "expected"), [
    ("gpu canonical", "gpu", "h100-sxm-80gb", "h100-sxm-80gb"),
    ("gpu short alias", "gpu", "h100", "h100-sxm-80gb"),
    ("gpu upper case alias", "gpu", "H100", "h100-sxm-80gb"),
    ("gpu driver product name", "gpu", "NVIDIA H100 80GB HBM3", "h100-sxm-80gb"),
    ("gpu driver name, other case", "gpu", "nvidia a100-sxm4-40gb", "a100-sxm-40gb"),
    ("gpu mixed case canonical", "gpu", "A100-SXM-80GB", "a100-sxm-80gb"),
    ("model canonical", "model", "llama-3.1-8b", "llama-3.1-8b"),
    ("model alias", "model", "llama3.1-8b", "llama-3.1-8b"),
    ("model hf name, upper case", "model", "META-LLAMA-3.1-70B-INSTRUCT", "llama-3.1-70b"),
    ("model measurement alias", "model", "CodeLlama-13b-hf", "llama-2-13b"),
])
def test_names_resolve_case_insensitively_through_aliases(case: str, kind: str, name: str, expected: str) -> None:
    assert getattr(shipped_catalog(), kind)(name).name == expected, case


@pytest.mark.parametrize(("case", "kind", "name"), [
    ("unknown gpu", "gpu", "h200"),
    ("unknown model", "model", "gpt-5"),
    ("empty name", "model", ""),
])
def test_unknown_names_list_the_known_ones(case: str, kind: str, name: str) -> None:
    catalog = shipped_catalog()
    with pytest.raises(UnknownProfileError) as info:
        getattr(catalog, kind)(name)
    message = str(info.value)
    assert f"unknown {kind} {name!r}" in message, case
    known = catalog.gpus if kind == "gpu" else catalog.models
    for known_name in known:
        assert known_name in message, (case, known_name)


@pytest.mark.parametrize(("case", "model", "expected"), [
    ("llama-3.1-8b: 2 x 32 layers x 8 kv heads x 128 x 2 bytes", "llama-3.1-8b", 131072),
    ("llama-3.1-70b: 2 x 80 x 8 x 128 x 2", "llama-3.1-70b", 327680),
    ("llama-2-13b, no GQA: 2 x 40 x 40 x 128 x 2", "llama-2-13b", 819200),
])
def test_kv_bytes_per_token(case: str, model: str, expected: int) -> None:
    assert shipped_catalog().model(model).kv_bytes_per_token == expected, case


def test_weights_split_over_tensor_parallel_gpus() -> None:
    model = shipped_catalog().model("llama-3.1-70b")
    assert model.tp_on("h100-sxm-80gb") == 4
    assert model.weights_bytes == pytest.approx(70.55e9 * 2)
    assert model.weights_gib_per_gpu("h100-sxm-80gb") == pytest.approx(70.55e9 * 2 / 4 / 2**30)
    with pytest.raises(UnknownProfileError, match="llama-3.1-70b.*h200"):
        model.tp_on("h200")


@pytest.mark.parametrize(("case", "gpu", "highest", "lowest", "count"), [
    ("h100: 1980..345 by 15", "h100-sxm-80gb", 1980, 345, 110),
    ("a100: 1410..210 by 15", "a100-sxm-80gb", 1410, 210, 81),
])
def test_supported_clocks_step_down_from_max_to_min(case: str, gpu: str, highest: int, lowest: int,
                                                    count: int) -> None:
    spec = shipped_catalog().gpu(gpu)
    clocks = spec.supported_clocks_mhz
    assert (clocks[0], clocks[-1], len(clocks)) == (highest, lowest, count), case
    assert all(a - b == spec.clock_step_mhz for a, b in itertools.pairwise(clocks)), case
    assert set(spec.table_clocks_mhz) <= set(clocks), case


@pytest.mark.parametrize(("case", "file", "old", "new", "expected"), [
    ("missing gpu field", "gpus.toml", "tdp_w = 700.0\n", "", "[h100-sxm-80gb] is missing field tdp_w"),
    ("negative gpu field", "gpus.toml", "idle_w = 70.0", "idle_w = -70.0",
     "[h100-sxm-80gb] field idle_w must be a positive number, got -70.0"),
    ("zero gpu field", "gpus.toml", "memory_gib = 80", "memory_gib = 0",
     "[h100-sxm-80gb] field memory_gib must be a positive number, got 0"),
    ("string gpu field", "gpus.toml", "max_clock_mhz = 1980", "max_clock_mhz = '1980'",
     "[h100-sxm-80gb] field max_clock_mhz must be a positive number, got '1980'"),
    ("unknown gpu field", "gpus.toml", "tdp_w = 700.0\n", "tdp_w = 700.0\ntdp_watts = 700.0\n",
     "[h100-sxm-80gb] has unknown field tdp_watts"),
    ("table clock not supported", "gpus.toml", "table_clocks_mhz = [1980, 1860,", "table_clocks_mhz = [1985, 1860,",
     "[h100-sxm-80gb] table clock 1985 MHz is not a supported clock"),
    ("table clock above max", "gpus.toml", "table_clocks_mhz = [1980, 1860,", "table_clocks_mhz = [1995, 1860,",
     "[h100-sxm-80gb] table clock 1995 MHz is not a supported clock"),
    ("missing model field", "models.toml", "kv_heads = 8\n", "", "[mistral-7b] is missing field kv_heads"),
    ("negative model field", "models.toml", "layers = 32", "layers = -32",
     "[mistral-7b] field layers must be a positive number, got -32"),
    ("tp below one", "models.toml", "tp = { h100-sxm-80gb = 1,", "tp = { h100-sxm-80gb = 0,",
     "[mistral-7b] field tp must map GPU names to integers >= 1"),
    ("entry not a table", "models.toml", "[mistral-7b]", "mistral-7b = 3\n[mistral-7b-x]",
     "[mistral-7b] must be a table"),
])
def test_bad_spec_file_is_one_line_error_naming_file_and_field(
        tmp_path: Path, case: str, file: str, old: str, new: str, expected: str) -> None:
    folder = specs_dir(tmp_path, file, edit_shipped(file, old, new))
    with pytest.raises(ProfileError) as info:
        Catalog.load(folder)
    message = str(info.value)
    assert "\n" not in message, case
    assert message.startswith(f"{folder / file}: "), (case, message)
    assert expected in message, (case, message)


@pytest.mark.parametrize(("case", "file", "text", "expected"), [
    ("invalid TOML", "gpus.toml", "[h100\n", "invalid TOML"),
    ("dotted name not quoted", "models.toml", "[llama-3.1-8b]\nhf_name = 'x'\n", "[llama-3] is missing field"),
])
def test_unparsable_spec_file_is_one_line_error(tmp_path: Path, case: str, file: str, text: str,
                                               expected: str) -> None:
    folder = specs_dir(tmp_path, file, text)
    with pytest.raises(ProfileError) as info:
        Catalog.load(folder)
    assert "\n" not in str(info.value), case
    assert re.match(rf"{re.escape(str(folder / file))}: .*{re.escape(expected)}", str(info.value)), case


def test_missing_spec_file_names_its_path(tmp_path: Path) -> None:
    folder = specs_dir(tmp_path)
    (folder / "models.toml").unlink()
    with pytest.raises(ProfileError, match=re.escape(f"{folder / 'models.toml'}: cannot read")):
        Catalog.load(folder)
