"""The torch worker's protocol and tensor shapes, on a stand-in torch that checks shapes only."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any

import pytest

from festina_hpc.profiles.torch_worker import ModelShape, build_step, serve

LLAMA_8B = ModelShape(params_b=8.03, layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, tp=1)


class OutOfMemoryError(RuntimeError):
    pass


class FakeTorch:
    """Tensors are shapes; matmul and attention check that their operands fit together."""

    bfloat16 = "bf16"

    def __init__(self, memory_limit_elements: float = 1e12) -> None:
        self.calls: list[str] = []
        self.memory_limit_elements = memory_limit_elements
        self.cuda = SimpleNamespace(is_available=lambda: True, get_device_name=lambda device: "Fake H100",
                                    synchronize=lambda device=None: None, empty_cache=lambda: None,
                                    OutOfMemoryError=OutOfMemoryError)
        self.nn = SimpleNamespace(functional=SimpleNamespace(scaled_dot_product_attention=self.sdpa))

    def device(self, kind: str, index: int) -> str:
        return f"{kind}:{index}"

    def randn(self, *shape: int, device: Any, dtype: Any) -> tuple[int, ...]:
        elements = 1
        for n in shape:
            elements *= n
        if elements > self.memory_limit_elements:
            raise OutOfMemoryError("CUDA out of memory")
        return tuple(shape)

    def matmul(self, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        assert a[-1] == b[0], (a, b)
        self.calls.append("matmul")
        return (*a[:-1], b[-1])

    def sdpa(self, q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], is_causal: bool = False) -> Any:
        assert q[:2] == k[:2] == v[:2] and q[-1] == k[-1] and k[-2] == v[-2], (q, k, v)
        self.calls.append("causal attention" if is_causal else "attention")
        return q


@pytest.mark.parametrize("phase,gemms_per_step", [("prefill", 32 * 15), ("decode", 32)])
def test_a_step_has_the_models_layers_and_compatible_shapes(phase: str, gemms_per_step: int) -> None:
    torch = FakeTorch()
    step = build_step(torch, "cuda:0", LLAMA_8B, phase, batch=4, context_tokens=512)
    step()
    assert torch.calls.count("matmul") == gemms_per_step
    assert torch.calls.count("causal attention" if phase == "prefill" else "attention") == 32


def run_worker(monkeypatch: pytest.MonkeyPatch, torch: FakeTorch, requests: list[dict[str, Any]]) -> list[Any]:
    monkeypatch.setitem(sys.modules, "torch", torch)
    stdout = io.StringIO()
    assert serve(io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), stdout) == 0
    return [json.loads(line) for line in stdout.getvalue().splitlines()]


def prepare(batch: int = 2, phase: str = "decode") -> dict[str, Any]:
    return {"op": "prepare", "phase": phase, "batch": batch, "context_tokens": 256, "shape": asdict(LLAMA_8B)}


def test_the_worker_answers_each_request_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    replies = run_worker(monkeypatch, FakeTorch(), [prepare(), {"op": "run", "min_duration_s": 0.0}])
    assert replies == [{"ok": True, "device": "Fake H100"}, {"ok": True}, {"ok": True, "steps": 1}]


def test_the_worker_reports_failures_and_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = FakeTorch(memory_limit_elements=1e7)
    replies = run_worker(monkeypatch, torch, [
        {"op": "run", "min_duration_s": 0.0},
        prepare(batch=1000, phase="prefill"),
        {"op": "fly"},
        prepare(batch=1, phase="dance"),
    ])
    assert replies[1:] == [
        {"ok": False, "error": "RuntimeError: run before prepare"},
        {"ok": False, "error": "the workload does not fit in GPU memory"},
        {"ok": False, "error": "ValueError: unknown op 'fly'"},
        {"ok": False, "error": "ValueError: phase = 'dance' is not prefill or decode"},
    ]
