"""The serving job's argv: the simulated server or vLLM, from one spec."""

from __future__ import annotations

import pytest

from festina_hpc.errors import FestinaError
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.launch import EngineArgsError, serve_spec, serving_argv, split_engine_args


def test_simulated_argv(store: ProfileStore) -> None:
    spec = serve_spec(store, "llama3.1-8b", "h100", 8001, sm_pct=50, clock_mhz=1500, batch_cap=32)
    assert serving_argv(spec, "simulated") == [
        "festina", "serve", "--engine", "emulated", "--model", "llama-3.1-8b", "--gpu-type", "h100-sxm-80gb",
        "--host", "0.0.0.0", "--port", "8001", "--sm-pct", "50", "--batch-cap", "32", "--clock-mhz", "1500"]


def test_vllm_argv_loads_the_hf_model_under_festinas_name(store: ProfileStore) -> None:
    spec = serve_spec(store, "llama-3.1-70b", "h100", 8002, batch_cap=64, memory_fraction=0.5)
    assert serving_argv(spec, "vllm") == [
        "vllm", "serve", "meta-llama/Meta-Llama-3.1-70B-Instruct", "--served-model-name", "llama-3.1-70b",
        "--host", "0.0.0.0", "--port", "8002", "--tensor-parallel-size", "4", "--max-num-seqs", "64",
        "--gpu-memory-utilization", "0.45"]


def test_a_secret_reaches_the_server_as_a_file_path_never_as_argv(store: ProfileStore) -> None:
    spec = serve_spec(store, "llama-3.1-8b", "h100", 8001, secret_file="/var/lib/festina/secrets/instance-3.secret")
    emulated = serving_argv(spec, "emulated")
    assert emulated[-2:] == ["--secret-file", "/var/lib/festina/secrets/instance-3.secret"]
    vllm = serving_argv(spec, "vllm")
    # vLLM has no secret-file flag: a wrapper reads the file and hands vLLM the key in its environment.
    assert vllm[1:6] == ["-m", "festina_hpc.serve.launch", "--secret-file",
                         "/var/lib/festina/secrets/instance-3.secret", "--"]
    assert vllm[6:8] == ["vllm", "serve"] and "--api-key" not in vllm


def test_unknown_engine(store: ProfileStore) -> None:
    with pytest.raises(FestinaError, match="engine = 'sglang'"):
        serving_argv(serve_spec(store, "llama-3.1-8b", "h100", 1), "sglang")


def test_engine_args_follow_the_vllm_argv_as_words(store: ProfileStore) -> None:
    spec = serve_spec(store, "llama-3.1-8b", "h100", 8003,
                      engine_args="--max-model-len 8192 --override-generation-config '{\"temperature\": 0}'")
    assert serving_argv(spec, "vllm")[-4:] == ["--max-model-len", "8192", "--override-generation-config",
                                               '{"temperature": 0}']


def test_the_emulated_engine_takes_its_subset_and_ignores_the_rest(store: ProfileStore) -> None:
    spec = serve_spec(store, "llama-3.1-8b", "h100", 8004,
                      engine_args="--max-model-len 8192 --chunk-tokens 512 --enforce-eager --drain-s=2")
    assert serving_argv(spec, "emulated")[-3:] == ["--chunk-tokens", "512", "--drain-s=2"]


@pytest.mark.parametrize(("case", "text", "message"), [
    ("unbalanced quote", "--max-model-len '8192", "is not valid shell words (No closing quotation)"),
    ("a flag festina sets", "--gpu-memory-utilization 0.5", "sets --gpu-memory-utilization"),
    ("underscore spelling", "--served_model_name=x", "sets --served-model-name"),
    ("a shell string is only words", "; rm -rf /", None),
])
def test_engine_args_are_split_never_run(case: str, text: str, message: str | None) -> None:
    if message is None:
        assert split_engine_args(text, "vllm") == (";", "rm", "-rf", "/"), case  # argv words, no shell
        return
    with pytest.raises(EngineArgsError, match=None) as info:
        split_engine_args(text, "vllm")
    assert message in str(info.value), case
