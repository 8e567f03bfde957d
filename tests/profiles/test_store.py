"""festina_hpc.profiles.store: predictions, energy accounting and table discovery."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from festina_hpc.errors import OutOfProfileRange, ProfileError, UnknownProfileError
from festina_hpc.profiles.physics import step
from festina_hpc.profiles.store import ProfileStore, table_path
from tests.conftest import H100_PARAMS


@pytest.mark.parametrize(("case", "model", "phase", "batch", "context", "tokens"), [
    ("decode: one token per sequence", "llama-3.1-8b", "decode", 64, 1024, 64),
    ("decode, tp=4", "llama-3.1-70b", "decode", 8, 4096, 8),
    ("prefill: every prompt token", "llama-3.1-8b", "prefill", 8, 1024, 8 * 1024),
    ("prefill, tp=4", "llama-3.1-70b", "prefill", 1, 128, 128),
    ("between grid points", "llama-3.1-8b", "decode", 20, 700, 20),
])
def test_prediction_energy_is_power_times_latency_over_all_gpus(
        profiles_dir: Path, case: str, model: str, phase: str, batch: int, context: int, tokens: int) -> None:
    store = ProfileStore(profiles_dir)
    hit = store.predict("h100", model, phase, batch, context, sm_pct=50, clock_mhz=1500)
    tp = store.model(model).tp_on("h100-sxm-80gb")
    assert hit.tp == tp, case
    assert hit.energy_j == pytest.approx(hit.power_w * hit.latency_s * tp, rel=1e-12), case
    assert hit.energy_per_token_j == pytest.approx(hit.energy_j / tokens, rel=1e-12), case
    table = store.table("h100", model).lookup(phase, batch, context, 50, 1500)
    assert (hit.latency_s, hit.power_w, hit.clamped) == (table.latency_s, table.power_w, False), case


def test_prediction_at_a_grid_point_is_the_physics_model(profiles_dir: Path) -> None:
    store = ProfileStore(profiles_dir)
    gpu, model = store.gpu("h100"), store.model("llama-3.1-70b")
    hit = store.predict("h100", "llama-3.1-70b", "prefill", 8, 1024, sm_pct=50, clock_mhz=1260)
    latency, power = step(gpu, model, 4, H100_PARAMS, "prefill", 8, 1024, 50, 1260)
    assert (hit.latency_s, hit.power_w) == (float(latency), float(power))


def test_prediction_echoes_resolved_names_and_inputs(profiles_dir: Path) -> None:
    hit = ProfileStore(profiles_dir).predict("H100", "Meta-Llama-3.1-8B-Instruct", "decode", 8, 1024, 25, 1380)
    assert hit.as_dict() | {"latency_s": 0, "power_w": 0, "energy_j": 0, "energy_per_token_j": 0} == {
        "gpu": "h100-sxm-80gb", "model": "llama-3.1-8b", "tp": 1, "phase": "decode", "batch": 8,
        "context_tokens": 1024, "sm_pct": 25, "clock_mhz": 1380, "latency_s": 0, "power_w": 0, "energy_j": 0,
        "energy_per_token_j": 0, "clamped": False}


def test_no_clock_means_the_gpu_max_clock(profiles_dir: Path) -> None:
    store = ProfileStore(profiles_dir)
    default = store.predict("h100", "llama-3.1-8b", "prefill", 8, 1024)
    assert default.clock_mhz == store.gpu("h100").max_clock_mhz == 1980
    assert default == store.predict("h100", "llama-3.1-8b", "prefill", 8, 1024, sm_pct=100.0, clock_mhz=1980)


@pytest.mark.parametrize(("case", "store_clamp", "call_clamp", "clamped"), [
    ("store clamps", True, None, True),
    ("call clamps", False, True, True),
    ("store errors", False, None, False),
    ("call overrides a clamping store", True, False, False),
])
def test_out_of_range_follows_store_default_unless_the_call_says(
        profiles_dir: Path, case: str, store_clamp: bool, call_clamp: bool | None, clamped: bool) -> None:
    store = ProfileStore(profiles_dir, clamp=store_clamp)
    if clamped:
        hit = store.predict("h100", "llama-3.1-8b", "decode", 512, 1024, clamp=call_clamp)
        edge = store.predict("h100", "llama-3.1-8b", "decode", 256, 1024)
        assert hit.clamped and (hit.latency_s, hit.power_w) == (edge.latency_s, edge.power_w), case
    else:
        with pytest.raises(OutOfProfileRange, match="^batch = 512 is outside"):
            store.predict("h100", "llama-3.1-8b", "decode", 512, 1024, clamp=call_clamp)


@pytest.mark.parametrize(("case", "gpu", "model", "expected"), [
    ("unknown model", "h100", "gpt-5", "unknown model 'gpt-5' (known: "),
    ("unknown gpu", "b200", "llama-3.1-8b", "unknown gpu 'b200' (known: a100-sxm-40gb, a100-sxm-80gb, h100-sxm-80gb)"),
])
def test_unknown_names_raise_unknown_profile(profiles_dir: Path, case: str, gpu: str, model: str,
                                             expected: str) -> None:
    with pytest.raises(UnknownProfileError, match=re.escape(expected)):
        ProfileStore(profiles_dir).predict(gpu, model, "decode", 8, 1024)


def test_missing_table_names_its_path(profiles_dir: Path) -> None:
    path = profiles_dir / "h100-sxm-80gb" / "mistral-7b.csv"
    with pytest.raises(UnknownProfileError) as info:
        ProfileStore(profiles_dir).predict("h100", "mistral-7b", "decode", 8, 1024)
    assert str(info.value) == f"no profile for model mistral-7b on gpu h100-sxm-80gb ({path} is missing)"


def test_malformed_table_error_names_the_file(profiles_dir: Path) -> None:
    path = table_path(profiles_dir, "h100-sxm-80gb", "llama-3.1-8b")
    path.write_text(path.read_text(encoding="utf-8").replace("\ndecode,1,", "\ndecode,x,", 1), encoding="utf-8")
    with pytest.raises(ProfileError, match=f"^{re.escape(str(path))}: row [0-9]+: field batch = 'x'"):
        ProfileStore(profiles_dir).table("h100", "llama-3.1-8b")


def test_shipped_lists_only_pairs_with_a_table_file(profiles_dir: Path) -> None:
    (profiles_dir / "h100-sxm-80gb" / "gpt-5.csv").write_text("not a known model", encoding="utf-8")
    (profiles_dir / "a100-sxm-80gb" / "llama-3.1-8b.csv").mkdir(parents=True)
    store = ProfileStore(profiles_dir)
    assert store.shipped() == [("h100-sxm-80gb", "llama-3.1-70b"), ("h100-sxm-80gb", "llama-3.1-8b")]


def test_tables_load_once_per_pair_whatever_the_alias(profiles_dir: Path) -> None:
    store = ProfileStore(profiles_dir)
    assert store.table("h100", "llama3.1-8b") is store.table("H100-SXM-80GB", "llama-3.1-8b")


def test_clamped_energy_per_token_counts_the_edge_step(profiles_dir: Path) -> None:
    store = ProfileStore(profiles_dir)
    clamped = store.predict("h100", "llama-3.1-8b", "decode", 512, 1024, clamp=True)
    edge = store.predict("h100", "llama-3.1-8b", "decode", 256, 1024)
    assert clamped.energy_per_token_j == pytest.approx(edge.energy_per_token_j)


@pytest.mark.parametrize(("field", "old", "new"), [
    ("gpu", "gpu=h100-sxm-80gb", "gpu=a100-sxm-80gb"),
    ("model", "model=llama-3.1-8b", "model=mistral-7b"),
    ("tp", "tp=1", "tp=2"),
])
def test_table_header_must_match_its_place(profiles_dir: Path, field: str, old: str, new: str) -> None:
    path = table_path(profiles_dir, "h100-sxm-80gb", "llama-3.1-8b")
    path.write_text(path.read_text(encoding="utf-8").replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ProfileError, match=f"^{re.escape(str(path))}: row 1: header field {field} = "):
        ProfileStore(profiles_dir).table("h100", "llama-3.1-8b")
