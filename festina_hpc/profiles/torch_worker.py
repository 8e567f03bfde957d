"""The child process that runs the profiler's torch micro-workload on one GPU, driven over stdin/stdout.

``festina profiles measure`` on a real GPU starts one of these per SM share:
an MPS client's share (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) is fixed when
its CUDA context is created, so a share needs its own process. The parent
(``TorchStepRunner``) sets the environment, so the worker always uses
``cuda:0``. The protocol is one JSON object per line each way: on start the
worker answers ``{"ok": true, "device": ...}`` once CUDA is ready; then
``{"op": "prepare", "phase", "batch", "context_tokens", "shape": {...}}``
builds and warms up a step, and ``{"op": "run", "min_duration_s"}`` repeats it
until that much time has passed and answers the number of steps. Any failure
is answered as ``{"ok": false, "error": "<one line>"}``.

The micro-workload is model-shaped, in bf16: a prefill is the model's GEMM
FLOPs (square GEMMs of the hidden size) plus causal attention over each
prompt; a decode streams one layer's worth of weights through a skinny GEMM
and the KV cache through attention, once per layer. It approximates a serving
engine's step; it does not replace one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class ModelShape:
    """What the micro-workload needs of a model: its architecture and tensor parallelism."""

    params_b: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    tp: int


def build_step(torch: Any, device: Any, shape: ModelShape, phase: str, batch: int,
               context_tokens: int) -> Callable[[], None]:
    """One step of the micro-workload on one GPU (the model's share of work on it, 1/tp)."""
    kwargs = {"device": device, "dtype": torch.bfloat16}
    layer_params = shape.params_b * 1e9 / shape.layers / shape.tp
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if phase == "prefill":
        heads = max(1, shape.heads // shape.tp)
        square = torch.randn(shape.hidden, shape.hidden, **kwargs)
        gemms_per_layer = max(1, round(layer_params / shape.hidden**2))
        x = torch.randn(batch * context_tokens, shape.hidden, **kwargs)
        q, k, v = (torch.randn(batch, heads, context_tokens, shape.head_dim, **kwargs) for _ in range(3))

        def prefill() -> None:
            for _ in range(shape.layers):
                for _ in range(gemms_per_layer):
                    torch.matmul(x, square)
                sdpa(q, k, v, is_causal=True)

        return prefill
    if phase != "decode":
        raise ValueError(f"phase = {phase!r} is not prefill or decode")
    kv_heads = max(1, shape.kv_heads // shape.tp)
    # One layer's weights, re-read per layer: far larger than L2, so every read streams from HBM.
    weights = torch.randn(shape.hidden, max(1, round(layer_params / shape.hidden)), **kwargs)
    x = torch.randn(batch, shape.hidden, **kwargs)
    q = torch.randn(batch, kv_heads, 1, shape.head_dim, **kwargs)
    k, v = (torch.randn(batch, kv_heads, context_tokens, shape.head_dim, **kwargs) for _ in range(2))

    def decode() -> None:
        for _ in range(shape.layers):
            torch.matmul(x, weights)
            sdpa(q, k, v)

    return decode


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def serve(stdin: TextIO, stdout: TextIO) -> int:
    """Answer requests from ``stdin`` until it closes; the process exit status."""

    def reply(**fields: Any) -> None:
        stdout.write(json.dumps(fields) + "\n")
        stdout.flush()

    try:
        import torch
    except ImportError:
        reply(ok=False, error="torch is not importable in the worker's Python")
        return 1
    if not torch.cuda.is_available():
        reply(ok=False, error="torch sees no CUDA GPU in the worker")
        return 1
    device = torch.device("cuda", 0)
    reply(ok=True, device=torch.cuda.get_device_name(device))
    step: Callable[[], None] | None = None
    for line in stdin:
        # Every failure goes back to the parent as one line; the parent decides what it means.
        try:
            request = json.loads(line)
            if request["op"] == "prepare":
                step = None
                torch.cuda.empty_cache()
                step = build_step(torch, device, ModelShape(**request["shape"]), request["phase"],
                                  int(request["batch"]), int(request["context_tokens"]))
                step()
                torch.cuda.synchronize(device)
                reply(ok=True)
            elif request["op"] == "run":
                if step is None:
                    raise RuntimeError("run before prepare")
                steps, start_s = 0, time.perf_counter()
                while True:
                    step()
                    steps += 1
                    torch.cuda.synchronize(device)
                    if time.perf_counter() - start_s >= float(request["min_duration_s"]):
                        break
                reply(ok=True, steps=steps)
            else:
                raise ValueError(f"unknown op {request['op']!r}")
        except torch.cuda.OutOfMemoryError:
            step = None
            torch.cuda.empty_cache()
            reply(ok=False, error="the workload does not fit in GPU memory")
        except Exception as exc:
            reply(ok=False, error=_one_line(exc))
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.stdin, sys.stdout))
