"""The OpenAI-compatible completions API as both sides of festina speak it: parsing, validation, JSON shapes.

The model server (``festina serve``) and the festinad gateway accept the same
``POST /v1/completions`` bodies and answer in the same shapes as vLLM's
OpenAI server, so a client cannot tell a simulated instance from a real one.
Validation names the field and the value it refused; errors carry OpenAI's
error JSON (``{"error": {"message", "type", "param", "code"}}``).

Prompt tokens are counted here without a tokenizer: a string prompt counts
its whitespace-separated words, a token-id list its length. Real tokenizers
give about 1.3 tokens per English word, so the count is an underestimate; it
is used only where no engine count exists yet (the gateway's routing
decision, the simulated engine's pacing). Records prefer the upstream's
``usage`` when it comes back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from festina_hpc.errors import FestinaError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_JSON_DEPTH = 32  # a completions body nests 2 deep (stream_options, a token list); deeper is refused
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, brackets in it are not structure
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(FestinaError):
    """An HTTP error with OpenAI's error body; ``headers`` go on the response (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 error_type: str = "invalid_request_error", code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_field(field: str, value: Any, why: str) -> ApiError:
    return ApiError(400, f"{field} = {_short(value)} {why}", param=field)


def unknown_model(name: str, known: Sequence[str]) -> ApiError:
    return ApiError(404, f"model {name!r} does not exist (known: {', '.join(known) or 'none'})", param="model",
                    code="model_not_found")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` body; ``body`` is the whole JSON object as sent."""

    model: str
    prompt_tokens: int  # the approximation described in the module docstring
    max_tokens: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final chunk with usage before [DONE]
    body: Mapping[str, Any]


def count_prompt_tokens(prompt: str | Sequence[int]) -> int:
    """Whitespace words of a string prompt, or the length of a token-id list (no tokenizer)."""
    if isinstance(prompt, str):
        return len(prompt.split())
    return len(prompt)


def json_depth(raw: bytes) -> int:
    """How deep ``raw``'s arrays and objects nest, counted without recursion (brackets in strings skipped)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot nest deeper than the bound: the common case, decided at C speed
    depth = deepest = 0
    for bracket in _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw)):
        if bracket in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_bounded(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses bodies nested deeper than ``max_depth`` with a 400, before parsing them.

    ``json.loads`` recurses once per level, so a body nested a few thousand deep would otherwise
    end in ``RecursionError`` (a 500) after the parser has used the stack."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise ApiError(400, f"request body nests JSON {depth} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the pre-scan miscounted an invalid body: still the client's error
        raise ApiError(400, f"request body nests JSON deeper than {max_depth} levels") from None


def parse_completion(raw: bytes) -> CompletionRequest:
    """Validate a request body; raises ``ApiError`` (400) naming the field and value."""
    body = loads_bounded(raw)
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_short(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_field("model", model, "must be a non-empty string")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise bad_field("prompt", prompt, "must not be empty")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in prompt):
        pass
    else:
        # Batched prompts (a list of strings or of token lists) are valid OpenAI but not served here:
        # one request is one sequence, which is what the router and the records count.
        raise bad_field("prompt", prompt, "must be a non-empty string or a non-empty list of token ids")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_field("max_tokens", max_tokens, "must be an integer >= 1")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_field("stream", stream, "must be true or false")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise bad_field("stream_options", options, 'must be an object like {"include_usage": true}')
        if not stream:
            raise bad_field("stream_options", options, "is only allowed with stream = true")
        include_usage = bool(options.get("include_usage", False))
    for field in ("n", "best_of"):
        value = body.get(field, 1)
        if value is not None and value != 1:
            raise bad_field(field, value, "is not supported (only 1)")
    return CompletionRequest(model=model, prompt_tokens=count_prompt_tokens(prompt), max_tokens=max_tokens,
                             stream=stream, include_usage=include_usage, body=body)


def check_limits(model: str, req: CompletionRequest, *, max_prompt_tokens: int | None = None,
                 max_output_tokens: int | None = None, context_tokens: int | None = None) -> None:
    """``ApiError`` (400) for a request over ``model``'s limits (a None limit is not checked).

    The prompt's size is the word-count approximation (``count_prompt_tokens``): a prompt the
    engine's tokenizer finds a little longer can pass here and be refused by the engine."""
    if max_prompt_tokens is not None and req.prompt_tokens > max_prompt_tokens:
        raise ApiError(400, f"prompt has {req.prompt_tokens} tokens; {model} takes at most {max_prompt_tokens}",
                       param="prompt", code="context_length_exceeded")
    if max_output_tokens is not None and req.max_tokens > max_output_tokens:
        raise bad_field("max_tokens", req.max_tokens, f"is above {model}'s limit of {max_output_tokens} output tokens")
    if context_tokens is not None and req.prompt_tokens + req.max_tokens > context_tokens:
        raise ApiError(400, f"prompt ({req.prompt_tokens} tokens) plus max_tokens ({req.max_tokens}) is "
                            f"{req.prompt_tokens + req.max_tokens} tokens; {model}'s context holds {context_tokens}",
                       param="max_tokens", code="context_length_exceeded")


# -- response shapes ---------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(completion_id: str, created_s: int, model: str, text: str,
                     finish_reason: str | None) -> dict[str, Any]:
    """One streamed event: a piece of the text (one token here), ``finish_reason`` on the last."""
    return {"id": completion_id, "object": "text_completion", "created": created_s, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(completion_id: str, created_s: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last streamed event when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {"id": completion_id, "object": "text_completion", "created": created_s, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def completion(completion_id: str, created_s: int, model: str, text: str, finish_reason: str | None,
               prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streamed answer."""
    return {"id": completion_id, "object": "text_completion", "created": created_s, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_list(names: Sequence[str], created_s: int, owned_by: str = "festina") -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": created_s, "owned_by": owned_by} for name in names]}


def sse(event: Mapping[str, Any]) -> bytes:
    """A server-sent event carrying one JSON object."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
