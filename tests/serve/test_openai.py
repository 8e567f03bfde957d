"""Request validation and prompt counting of the OpenAI-compatible API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from festina_hpc.serve import openai


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hello world", **fields}).encode()


@pytest.mark.parametrize("case, raw, param", [
    ("not json", b"{nope", None),
    ("not an object", b"[1, 2]", None),
    ("no model", json.dumps({"prompt": "x"}).encode(), "model"),
    ("empty prompt", body(prompt="  "), "prompt"),
    ("batched prompts", body(prompt=["a", "b"]), "prompt"),
    ("negative token id", body(prompt=[1, -2]), "prompt"),
    ("max_tokens zero", body(max_tokens=0), "max_tokens"),
    ("max_tokens a string", body(max_tokens="5"), "max_tokens"),
    ("max_tokens true", body(max_tokens=True), "max_tokens"),
    ("stream a string", body(stream="yes"), "stream"),
    ("stream_options without stream", body(stream_options={"include_usage": True}), "stream_options"),
    ("n above 1", body(n=2), "n"),
])
def test_bad_requests_are_400_naming_the_field(case: str, raw: bytes, param: str | None) -> None:
    with pytest.raises(openai.ApiError) as info:
        openai.parse_completion(raw)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"
    if param:
        assert info.value.message.startswith(f"{param} = ")


@pytest.mark.parametrize("prompt, tokens", [("hello  big\nworld", 3), ([5, 6, 7, 8], 4), ("one", 1)])
def test_prompt_tokens_are_words_or_token_ids(prompt: str | list[int], tokens: int) -> None:
    assert openai.parse_completion(body(prompt=prompt)).prompt_tokens == tokens


def test_defaults_and_stream_options() -> None:
    req = openai.parse_completion(body())
    assert (req.max_tokens, req.stream, req.include_usage) == (openai.DEFAULT_MAX_TOKENS, False, False)
    req = openai.parse_completion(body(stream=True, stream_options={"include_usage": True}, max_tokens=3))
    assert (req.max_tokens, req.stream, req.include_usage) == (3, True, True)


@pytest.mark.parametrize("case, raw, depth", [
    ("flat", b'{"model": "m", "prompt": [1, 2]}', 0),  # few brackets: not scanned
    ("deep", b"[" * 40 + b"]" * 40, 40),
    ("brackets in a string", b'{"p": "' + b"[{" * 40 + b'"}', 1),
    ("escaped quote in a string", b'{"p": "\\" ' + b"[" * 40 + b'"}', 1),
    ("deep beside a string", b'{"p": "[[", "q": ' + b"[" * 40 + b"]" * 40 + b"}", 41),
], ids=lambda value: value if isinstance(value, str) else "")
def test_json_depth_skips_strings(case: str, raw: bytes, depth: int) -> None:
    assert openai.json_depth(raw) == depth, case


def test_deep_json_is_400_before_the_parser_recurses() -> None:
    with pytest.raises(openai.ApiError) as info:
        openai.parse_completion(b'{"model": "m", "prompt": "x", "u": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert info.value.status == 400
    assert str(info.value) == "request body nests JSON 200001 levels deep; at most 32 are accepted"
    within = b'{"model": "m", "prompt": "x", "u": ' + b"[" * 31 + b"]" * 31 + b"}"
    assert openai.parse_completion(within).model == "m"
