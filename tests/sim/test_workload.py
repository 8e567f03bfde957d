"""The simulator's workload: trace loading and its errors, model assignment, request building, SLOs, cold starts."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from festina_hpc.cluster.figures import FAST_LOAD, STANDARD_LOAD, ColdStartModel
from festina_hpc.cluster.slo import default_slo
from festina_hpc.config import default_profiles_dir, load_config
from festina_hpc.errors import ProfileError, TraceError, UnknownProfileError
from festina_hpc.profiles.specs import Catalog
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.experiment import ExperimentOptions, build_experiment
from festina_hpc.sim.workload import (
    DEFAULT_MODEL_MIX,
    UNIFORM,
    MixEntry,
    Popularity,
    Trace,
    assign_models,
    build_requests,
    load_trace,
    model_mix_path,
    parse_popularity,
    read_model_mix,
    shipped_trace,
    split_model_mix,
)
from tests.conftest import REPO_PROFILES, synthetic_point

ALIBABA_LOADS = Path("/work/shared/data/alibaba_gentd26_genai_serving/cluster-trace-v2026-GenAI/"
                     "basemodel_update_latency_anon.csv")
MIX3 = ("llama-3.1-8b", "mistral-7b", "llama-3.1-70b")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def make_trace(arrival_s: list[float], models: tuple[str, ...] | None = None) -> Trace:
    n = len(arrival_s)
    return Trace(arrival_s=np.array(arrival_s), prompt_tokens=np.full(n, 100), output_tokens=np.full(n, 10),
                 models=models, source="<test>")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def one_line_error(exc: pytest.ExceptionInfo[TraceError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- shipped traces


@pytest.mark.parametrize("name,rows", [("azure-code", 8819), ("azure-conv", 19366)])
def test_shipped_traces_load(name: str, rows: int) -> None:
    path = shipped_trace(name)
    assert path.is_file() and (path.parent / "LICENSE.CC-BY-4.0.txt").is_file()
    trace = load_trace(path)
    assert len(trace) == rows
    assert trace.arrival_s[0] == 0.0
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert 3400 < trace.duration_s < 3600  # about an hour
    assert trace.arrival_s.dtype == np.float64 and trace.prompt_tokens.dtype == np.int64
    assert trace.prompt_tokens.min() >= 1 and trace.output_tokens.min() >= 1
    assert trace.models is None and trace.source == str(path)
    assert trace.lines is not None and trace.lines[0] == 2 and trace.lines[-1] == rows + 1
    with pytest.raises(ValueError):
        trace.arrival_s[0] = 1.0  # read-only


def test_shipped_trace_first_rows_exact() -> None:
    trace = load_trace(shipped_trace("azure-code"))
    # 18:17:03.9799600, 18:17:04.0319600, 18:17:04.0781490 in the file
    np.testing.assert_allclose(trace.arrival_s[:3], [0.0, 0.052, 0.098189], atol=1e-9)
    assert trace.prompt_tokens[:3].tolist() == [4808, 3180, 110]
    assert trace.output_tokens[:3].tolist() == [10, 8, 27]


def test_unknown_shipped_trace_lists_names() -> None:
    with pytest.raises(TraceError) as exc:
        shipped_trace("azure-2024")
    assert "azure-code" in one_line_error(exc) and "azure-conv" in str(exc.value)


def test_conv_trace_loads_fast() -> None:
    path = shipped_trace("azure-conv")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        load_trace(path)
        best = min(best, time.perf_counter() - start)
    assert best < 0.3


# ---------------------------------------------------------------- formats


def test_seconds_from_start_equals_datetime(tmp_path: Path) -> None:
    trace = load_trace(shipped_trace("azure-conv"))
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    # Start at 7 s to check that arrivals are made relative to the first row.
    lines += [f"{t + 7.0!r},{p},{o}" for t, p, o in zip(trace.arrival_s.tolist(), trace.prompt_tokens.tolist(),
                                                        trace.output_tokens.tolist())]
    seconds = load_trace(write(tmp_path / "seconds.csv", "\n".join(lines) + "\n"))
    np.testing.assert_allclose(seconds.arrival_s, trace.arrival_s, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(seconds.prompt_tokens, trace.prompt_tokens)
    np.testing.assert_array_equal(seconds.output_tokens, trace.output_tokens)


@pytest.mark.parametrize("stamps,expected_s", [
    (["2023-11-16 18:00:00", "2023-11-16 18:00:01"], [0.0, 1.0]),
    (["2023-11-16 18:00:00.5", "2023-11-16T18:00:01.250"], [0.0, 0.75]),
    (["2023-11-16 23:59:59.9999999", "2023-11-17 00:00:00.000000100"], [0.0, 2e-7]),
    (["2023-11-16 18:00:00.123456789123", "2023-11-16 18:00:00.223456789999"], [0.0, 0.1]),  # > 9 digits truncated
    (["0", "1.5", "1.5", "1e2"], [0.0, 1.5, 1.5, 100.0]),
    (["  2.0", "3 "], [0.0, 1.0]),
])
def test_timestamp_formats(tmp_path: Path, stamps: list[str], expected_s: list[float]) -> None:
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{s},10,5\n" for s in stamps)
    trace = load_trace(write(tmp_path / "t.csv", text))
    np.testing.assert_allclose(trace.arrival_s, expected_s, rtol=0, atol=1e-12)


def test_columns_any_order_case_and_extra_blank_lines_and_crlf(tmp_path: Path) -> None:
    text = ("generatedtokens,Extra,timestamp,CONTEXTTOKENS,Model\r\n5,x,0.0,100,llama-3.1-8b\r\n\r\n"
            "7,y,2.0,200, mistral-7b\r\n")
    trace = load_trace(write(tmp_path / "t.csv", text))
    assert trace.prompt_tokens.tolist() == [100, 200] and trace.output_tokens.tolist() == [5, 7]
    assert trace.models == ("llama-3.1-8b", "mistral-7b")
    assert trace.lines is not None and trace.lines.tolist() == [2, 4]


HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
DT = "2023-11-16 18:17:0{}.9800000"


@pytest.mark.parametrize("case,text,line,needles", [
    ("empty file", "", None, ["empty file"]),
    ("blank lines only", "\n\n", None, ["empty file"]),
    ("header only", HEADER, None, ["only a header"]),
    ("missing column", "TIMESTAMP,ContextTokens\n0,10\n", 1, ["missing column GeneratedTokens"]),
    ("duplicate column", "TIMESTAMP,ContextTokens,GeneratedTokens,timestamp\n0,1,1,0\n", 1, ["twice"]),
    ("too few fields", HEADER + "0,10,5\n1,10\n", 3, ["expected 3 fields", "got 2"]),
    ("non-numeric prompt", HEADER + "0,10,5\n1,abc,5\n", 3, ["ContextTokens", "'abc'"]),
    ("fractional output", HEADER + "0,10,5\n1,10,5.5\n", 3, ["GeneratedTokens", "'5.5'"]),
    ("negative output", HEADER + "0,10,5\n1,10,-5\n", 3, ["GeneratedTokens", "'-5'"]),
    ("zero context", HEADER + "0,10,5\n1,0,5\n2,10,5\n", 3, ["ContextTokens", "'0'"]),
    ("zero generated", HEADER + "0,10,5\n1,10,0\n", 3, ["GeneratedTokens", "'0'"]),
    ("empty tokens", HEADER + "0,,5\n", 2, ["ContextTokens", "''"]),
    ("unsorted seconds", HEADER + "0,10,5\n2,10,5\n1.5,10,5\n", 4, ["goes backwards", "'1.5'", "line 3"]),
    ("unsorted datetimes", HEADER + f"{DT.format(1)},1,1\n{DT.format(3)},1,1\n{DT.format(2)},1,1\n", 4,
     ["goes backwards"]),
    ("negative seconds", HEADER + "0,10,5\n-1.0,10,5\n", 3, ["TIMESTAMP", ">= 0", "'-1.0'"]),
    ("negative first seconds", HEADER + "-3,10,5\n0,10,5\n", 2, ["TIMESTAMP", ">= 0", "'-3'"]),
    ("unparseable first timestamp", HEADER + "yesterday,10,5\n", 2, ["TIMESTAMP", "'yesterday'"]),
    ("nan seconds", HEADER + "0,10,5\nnan,10,5\n", 3, ["TIMESTAMP", "'nan'"]),
    ("datetime in a seconds file", HEADER + f"0,10,5\n{DT.format(1)},10,5\n", 3, ["TIMESTAMP", "seconds"]),
    ("seconds in a datetime file", HEADER + f"{DT.format(1)},10,5\n3.5,10,5\n", 3, ["TIMESTAMP", "'3.5'"]),
    ("hour out of range", HEADER + f"{DT.format(1)},10,5\n2023-11-16 25:00:00,10,5\n", 3,
     ["TIMESTAMP", "25:00:00"]),
    ("time zone", HEADER + f"{DT.format(1)},10,5\n2023-11-16 18:17:05+01:00,10,5\n", 3, ["TIMESTAMP"]),
    ("empty model", "TIMESTAMP,ContextTokens,GeneratedTokens,model\n0,10,5,a\n1,10,5, \n", 3, ["model is empty"]),
])
def test_bad_trace_is_one_line_error_naming_file_and_line(tmp_path: Path, case: str, text: str, line: int | None,
                                                           needles: list[str]) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(TraceError) as exc:
        load_trace(path)
    message = one_line_error(exc)
    assert message.startswith(f"{path}: "), message
    if line is not None:
        assert f"line {line}:" in message, message
    for needle in needles:
        assert needle in message, message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as exc:
        load_trace(tmp_path / "nope.csv")
    assert "nope.csv: cannot read" in one_line_error(exc)


# ---------------------------------------------------------------- model mix and popularity


def test_default_model_mix_names_shipped_models() -> None:
    catalog = Catalog.load(default_profiles_dir())
    assert len(set(DEFAULT_MODEL_MIX)) == len(DEFAULT_MODEL_MIX) == len(catalog.models)
    assert all(catalog.model(name).name == name for name in DEFAULT_MODEL_MIX)
    # Any N >= 4 mixes a tensor-parallel model with single-GPU ones.
    assert {catalog.model(m).tp_on("h100-sxm-80gb") for m in DEFAULT_MODEL_MIX[:4]} == {1, 2}


def test_read_model_mix(tmp_path: Path) -> None:
    path = write(tmp_path / "mix.txt", "# models\nllama-3.1-8b\n\n  mistral-7b  # second\nllama-3.1-70b\n")
    assert read_model_mix(path) == [MixEntry("llama-3.1-8b"), MixEntry("mistral-7b"), MixEntry("llama-3.1-70b")]
    weighted = write(tmp_path / "w.txt", "llama-3.1-8b, 3\nmistral-7b,1.5 # less\n")
    mix = read_model_mix(weighted)
    assert mix == [MixEntry("llama-3.1-8b", 3.0), MixEntry("mistral-7b", 1.5)]
    assert split_model_mix(mix) == (("llama-3.1-8b", "mistral-7b"), (3.0, 1.5))
    assert split_model_mix(read_model_mix(path)) == (MIX3, None)
    variants = write(tmp_path / "v.txt", "llama-3.1-8b, 2\nsupport-bot = llama-3.1-8b , 1\n")
    assert read_model_mix(variants) == [MixEntry("llama-3.1-8b", 2.0), MixEntry("support-bot", 1.0, "llama-3.1-8b")]


def test_a_variant_is_a_model_of_its_own_with_its_base_models_profile() -> None:
    store = ProfileStore(REPO_PROFILES)
    spec = store.catalog.add_variant("support-bot", "Meta-Llama-3.1-8B-Instruct")
    base = store.model("llama-3.1-8b")
    assert spec.name == "support-bot" and store.model("Support-Bot") is spec
    assert (spec.params_b, spec.tp) == (base.params_b, base.tp)
    assert store.table("h100", "support-bot") is store.table("h100", "llama-3.1-8b")
    assert store.catalog.add_variant("support-bot", "llama-3.1-8b") is spec  # again: the same variant
    assert ("h100-sxm-80gb", "support-bot") not in store.shipped()
    for name, profile in (("mistral-7b", "llama-3.1-8b"), ("support-bot", "mistral-7b")):
        with pytest.raises(ProfileError, match=f"model '{name}' is already"):
            store.catalog.add_variant(name, profile)
    with pytest.raises(UnknownProfileError, match="unknown model 'nope'"):
        store.catalog.add_variant("x", "nope")


def test_shipped_model_mixes_resolve_by_name(tmp_path: Path) -> None:
    mix = read_model_mix(model_mix_path("eight-on-one-node"))
    assert len(mix) == 8 and sum(entry.profile is not None for entry in mix) == 3
    store = ProfileStore(REPO_PROFILES)
    for entry in mix:  # every model fits one H100: a dedicated baseline can serve all eight on a node
        assert store.model(entry.profile or entry.name).tp_on("h100-sxm-80gb") == 1
    assert model_mix_path(tmp_path) == tmp_path
    with pytest.raises(TraceError, match="'nope' is neither a file nor a shipped mix .shipped: eight-on-one-node"):
        model_mix_path("nope")


def test_a_model_mix_with_variants_runs_each_as_its_own_model(tmp_path: Path) -> None:
    mix = write(tmp_path / "mix.txt", "llama-3.1-8b\nsupport-bot = llama-3.1-8b\n")
    store = ProfileStore(REPO_PROFILES)
    experiment = build_experiment(load_config(None), store, ExperimentOptions(
        trace="azure-conv", model_mix=mix, duration_s=120.0, nodes=1))
    assert {r.model for r in experiment.requests} == {"llama-3.1-8b", "support-bot"}
    assert experiment.slos["support-bot"] == experiment.slos["llama-3.1-8b"]
    result = experiment.run(store, "vllm")
    assert set(result.per_model) == {"llama-3.1-8b", "support-bot"} and result.requests_dropped == 0


@pytest.mark.parametrize("text,line,needle", [
    ("a, 1\nb\n", 2, "every line or on none"),
    ("a\nb, 2\n", 2, "every line or on none"),
    ("a, 0\n", 1, "positive"),
    ("a, -1\n", 1, "positive"),
    ("a, x\n", 1, "'x'"),
    ("a, nan\n", 1, "positive"),
    ("a, 1, 2\n", 1, "expected"),
    (", 1\n", 1, "empty"),
    ("a\n# c\nA\n", 3, "already listed on line 1"),
    ("a =\n", 1, "'name = profile'"),
    ("# nothing\n\n", None, "no models"),
])
def test_bad_model_mix(tmp_path: Path, text: str, line: int | None, needle: str) -> None:
    path = write(tmp_path / "mix.txt", text)
    with pytest.raises(TraceError) as exc:
        read_model_mix(path)
    message = one_line_error(exc)
    assert message.startswith(str(path)) and needle in message, message
    if line is not None:
        assert f"line {line}:" in message, message


@pytest.mark.parametrize("spec,zipf_s,text", [
    ("uniform", 0.0, "uniform"), (" Uniform ", 0.0, "uniform"), ("zipf:0", 0.0, "uniform"),
    ("zipf:1.0", 1.0, "zipf:1"), ("ZIPF:1.5", 1.5, "zipf:1.5"), ("zipf: 2", 2.0, "zipf:2"),
])
def test_parse_popularity(spec: str, zipf_s: float, text: str) -> None:
    popularity = parse_popularity(spec)
    assert popularity == Popularity(zipf_s) and str(popularity) == text
    assert parse_popularity(str(popularity)) == popularity


@pytest.mark.parametrize("spec", ["", "zipf", "zipf:", "zipf:-1", "zipf:abc", "zipf:nan", "zipf:inf", "pareto:1",
                                  "uniform:2"])
def test_bad_popularity(spec: str) -> None:
    with pytest.raises(TraceError) as exc:
        parse_popularity(spec)
    assert repr(spec) in one_line_error(exc)


def test_assign_models_deterministic_for_a_seed() -> None:
    popularity = parse_popularity("zipf:1.0")
    first = assign_models(1000, DEFAULT_MODEL_MIX, popularity, rng(42))
    np.testing.assert_array_equal(first, assign_models(1000, DEFAULT_MODEL_MIX, popularity, rng(42)))
    assert not np.array_equal(first, assign_models(1000, DEFAULT_MODEL_MIX, popularity, rng(43)))
    # Request k's model does not depend on how many requests are drawn.
    np.testing.assert_array_equal(first[:100], assign_models(100, DEFAULT_MODEL_MIX, popularity, rng(42)))
    assert first.dtype == np.int64 and first.min() >= 0 and first.max() < len(DEFAULT_MODEL_MIX)
    assert assign_models(0, DEFAULT_MODEL_MIX, popularity, rng()).shape == (0,)


def test_zipf_counts_follow_rank() -> None:
    n = 19366
    counts = np.bincount(assign_models(n, DEFAULT_MODEL_MIX, parse_popularity("zipf:1.0"), rng(7)),
                         minlength=len(DEFAULT_MODEL_MIX))
    assert all(a > b for a, b in zip(counts, counts[1:])), counts
    expected = n * (1 / np.arange(1, 9)) / (1 / np.arange(1, 9)).sum()
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (counts, expected)


def test_uniform_counts_roughly_equal() -> None:
    n = 19366
    counts = np.bincount(assign_models(n, DEFAULT_MODEL_MIX, UNIFORM, rng(7)), minlength=len(DEFAULT_MODEL_MIX))
    assert np.all(np.abs(counts / (n / len(DEFAULT_MODEL_MIX)) - 1) < 0.1), counts


def test_weights_override_popularity() -> None:
    counts = np.bincount(assign_models(10000, MIX3, parse_popularity("zipf:2"), rng(1), weights=[1, 1, 8]),
                         minlength=3)
    assert counts[2] > 7500 and counts[0] < 1300 and counts[1] < 1300, counts


@pytest.mark.parametrize("models,weights,needle", [
    ((), None, "empty"),
    (("a", "a"), None, "twice"),
    (("a", "b"), [1.0], "1 weights for 2 models"),
    (("a", "b"), [1.0, 0.0], "positive"),
    (("a", "b"), [1.0, float("nan")], "positive"),
])
def test_bad_assignment_inputs(models: tuple[str, ...], weights: list[float] | None, needle: str) -> None:
    with pytest.raises(TraceError) as exc:
        assign_models(10, models, UNIFORM, rng(), weights)
    assert needle in one_line_error(exc)


# ---------------------------------------------------------------- requests


def test_build_requests_whole_trace() -> None:
    trace = load_trace(shipped_trace("azure-code"))
    requests = build_requests(trace, MIX3, parse_popularity("zipf:1"), rng(3))
    assert [r.id for r in requests] == list(range(len(trace)))
    assert [r.arrival_s for r in requests] == trace.arrival_s.tolist()
    assert all(type(r.arrival_s) is float and type(r.prompt_tokens) is int for r in requests[:5])
    assert {r.model for r in requests} == set(MIX3)
    assert requests[0].prompt_tokens == 4808 and requests[0].output_tokens == 10


def test_rate_scale_divides_arrivals_and_keeps_models() -> None:
    trace = load_trace(shipped_trace("azure-code"))
    base = build_requests(trace, MIX3, UNIFORM, rng(5))
    double = build_requests(trace, MIX3, UNIFORM, rng(5), rate_scale=2.0)
    np.testing.assert_allclose([r.arrival_s for r in double], [r.arrival_s / 2 for r in base])
    assert [r.model for r in double] == [r.model for r in base]


def test_duration_limit_is_a_prefix() -> None:
    trace = load_trace(shipped_trace("azure-conv"))
    full = build_requests(trace, DEFAULT_MODEL_MIX, parse_popularity("zipf:1"), rng(9), rate_scale=2.0)
    cut = build_requests(trace, DEFAULT_MODEL_MIX, parse_popularity("zipf:1"), rng(9), rate_scale=2.0,
                         duration_s=600.0)
    assert len(cut) == int(np.sum(trace.arrival_s / 2.0 < 600.0)) > 0
    assert all(r.arrival_s < 600.0 for r in cut)
    assert cut == full[:len(cut)]


def test_duration_cuts_at_strictly_less() -> None:
    requests = build_requests(make_trace([0.0, 1.0, 2.0, 3.0]), MIX3, UNIFORM, rng(), duration_s=2.0)
    assert [r.arrival_s for r in requests] == [0.0, 1.0]


def test_model_column_is_used(tmp_path: Path) -> None:
    text = "TIMESTAMP,ContextTokens,GeneratedTokens,model\n0,10,5,mistral-7b\n1,20,6,llama-3.1-70b\n"
    trace = load_trace(write(tmp_path / "t.csv", text))
    requests = build_requests(trace, MIX3, parse_popularity("zipf:3"), rng(), weights=[10, 1, 1])
    assert [r.model for r in requests] == ["mistral-7b", "llama-3.1-70b"]


def test_unknown_model_in_column_names_line(tmp_path: Path) -> None:
    text = "TIMESTAMP,ContextTokens,GeneratedTokens,model\n0,10,5,mistral-7b\n1,20,6,gpt-4\n"
    path = write(tmp_path / "t.csv", text)
    with pytest.raises(TraceError) as exc:
        build_requests(load_trace(path), MIX3, UNIFORM, rng(), duration_s=0.5)
    message = one_line_error(exc)
    assert message.startswith(f"{path}: line 3:") and "'gpt-4'" in message and "llama-3.1-8b" in message


@pytest.mark.parametrize("kwargs,needle", [
    ({"rate_scale": 0.0}, "rate_scale"), ({"rate_scale": -1.0}, "rate_scale"),
    ({"rate_scale": float("inf")}, "rate_scale"), ({"duration_s": 0.0}, "duration_s"),
    ({"duration_s": -5.0}, "duration_s"), ({"duration_s": float("nan")}, "duration_s"),
])
def test_bad_build_arguments(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(TraceError) as exc:
        build_requests(make_trace([0.0, 1.0]), MIX3, UNIFORM, rng(), **kwargs)  # type: ignore[arg-type]
    assert needle in one_line_error(exc)


def test_trace_rejects_mismatched_lengths() -> None:
    with pytest.raises(TraceError):
        Trace(arrival_s=np.zeros(2), prompt_tokens=np.ones(3), output_tokens=np.ones(2), models=None, source="x")


# ---------------------------------------------------------------- SLOs


SHIPPED_STORE = ProfileStore(default_profiles_dir())


@pytest.mark.parametrize("model", DEFAULT_MODEL_MIX)
def test_default_slo_on_h100(model: str) -> None:
    slo = default_slo(SHIPPED_STORE, "h100", model)
    assert 0 < slo.tbt_s < slo.ttft_s
    assert slo.ttft_s < 2.0 and slo.tbt_s < 0.5  # interactive, not absurd


def test_default_slo_is_multiple_of_unloaded_latency(synthetic_store: ProfileStore) -> None:
    slo = default_slo(synthetic_store, "h100", "llama-3.1-8b", ttft_multiplier=4.0, tbt_multiplier=2.0,
                      reference_prompt_tokens=512)
    prefill_s, _ = synthetic_point("prefill", 1, 512, 100, 1980)
    decode_s, _ = synthetic_point("decode", 1, 512, 100, 1980)
    assert slo.ttft_s == pytest.approx(4.0 * prefill_s)
    assert slo.tbt_s == pytest.approx(2.0 * decode_s)
    long_s, _ = synthetic_point("prefill", 1, 2048, 100, 1980)  # the synthetic table's longest context
    assert slo.ttft_for(512) == slo.ttft_for(100) == slo.ttft_s
    assert slo.ttft_for(2048) == pytest.approx(4.0 * long_s)


@pytest.mark.parametrize("kwargs", [{"ttft_multiplier": 0.0}, {"tbt_multiplier": -1.0},
                                    {"reference_prompt_tokens": 0}])
def test_bad_slo_arguments(synthetic_store: ProfileStore, kwargs: dict[str, float]) -> None:
    with pytest.raises(TraceError):
        default_slo(synthetic_store, "h100", "llama-3.1-8b", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- cold starts


def test_cold_start_ordering() -> None:
    catalog = Catalog.load(default_profiles_dir())
    for name in DEFAULT_MODEL_MIX:
        model = catalog.model(name)
        tp = model.tp_on("h100-sxm-80gb")
        assert FAST_LOAD.cold_start_s(model, tp) < STANDARD_LOAD.cold_start_s(model, tp)
        assert STANDARD_LOAD.cold_start_s(model, tp) > STANDARD_LOAD.engine_init_s
    small, big = catalog.model("llama-3.1-8b"), catalog.model("llama-3.1-70b")
    for preset in (STANDARD_LOAD, FAST_LOAD):
        assert preset.cold_start_s(big, 1) > preset.cold_start_s(small, 1)
        assert preset.cold_start_s(big, 4) > preset.cold_start_s(small, 1)  # 17.6 GB per GPU vs 16.1
        assert preset.cold_start_s(big, 4) < preset.cold_start_s(big, 1)  # shards load in parallel


def test_cold_start_figures() -> None:
    model = Catalog.load(default_profiles_dir()).model("llama-3.1-8b")
    assert STANDARD_LOAD.cold_start_s(model, 1) == pytest.approx(10.0 + 16.06 / 2.5)
    assert FAST_LOAD.cold_start_s(model, 1) == pytest.approx(2.0 + 16.06 / 20.0)


@pytest.mark.parametrize("init_s,gbs", [(-1.0, 2.5), (1.0, 0.0), (float("nan"), 2.5), (1.0, float("inf"))])
def test_bad_cold_start_model(init_s: float, gbs: float) -> None:
    with pytest.raises(TraceError):
        ColdStartModel("bad", engine_init_s=init_s, load_bandwidth_gbs=gbs)


def test_cold_start_rejects_zero_tp() -> None:
    with pytest.raises(TraceError):
        STANDARD_LOAD.cold_start_s(Catalog.load(default_profiles_dir()).model("mistral-7b"), 0)


@pytest.mark.skipif(not ALIBABA_LOADS.is_file(), reason="Alibaba GenTD26 data not present")
def test_alibaba_base_model_loads_cross_check() -> None:
    """The figures quoted at FAST_LOAD: Stable Diffusion base-model loads in production (not LLMs)."""
    loads_s = np.loadtxt(ALIBABA_LOADS, delimiter=",", skiprows=1, usecols=1) / 1000.0
    median_s, p90_s = np.median(loads_s), np.percentile(loads_s, 90)
    print(f"Alibaba GenTD26 base-model loads: n={loads_s.size} median={median_s:.1f} s p90={p90_s:.1f} s")
    assert loads_s.size == 7531
    assert median_s == pytest.approx(22.7, abs=0.05) and p90_s == pytest.approx(42.0, abs=0.05)
    fast_mode = loads_s[loads_s < 10.0]
    lo_s, hi_s = np.percentile(fast_mode, [10, 90])
    sd_model = replace(Catalog.load(default_profiles_dir()).model("llama-2-7b"), params_b=1.0)
    for gigabytes in (2.0, 7.0):  # SD 1.5 to SDXL checkpoints in FP16
        spec = replace(sd_model, params_b=gigabytes / 2)
        assert lo_s <= FAST_LOAD.cold_start_s(spec, 1) <= hi_s
        assert hi_s < STANDARD_LOAD.cold_start_s(spec, 1) < np.median(loads_s[loads_s >= 10.0])
