"""The analytical latency and power model that the profile tables are computed from.

One step of an instance (a prefill of ``batch`` prompts of ``context`` tokens,
or one decode step of ``batch`` sequences holding ``context`` tokens of KV
cache) on each of its ``tp`` GPUs takes::

    latency = step_overhead + layer_overhead * layers + seq_overhead * batch + t_gpu + t_comm
    t_gpu   = smooth_max(t_compute, t_memory)             (roofline, p-norm k=4)
    t_compute = flops / tp / (peak * eff_compute * s) * (alpha / f + 1 - alpha)
    t_memory  = (weights + batch * context * kv_per_token) / tp
                / (bandwidth * eff_memory * min(1, s / SM_SATURATION))
    t_comm  = (tp > 1) * 2 * layers * (ALLREDUCE_LATENCY + all-reduce bytes / link bandwidth)

with ``s`` the SM share (MPS active-thread percentage / 100) and ``f`` the SM
clock over the GPU's max clock. Prefill is compute-bound, so its latency grows
roughly as 1/(f * s); decode streams weights and KV cache, so it is
memory-bound and barely clock-sensitive. FLOPs count 2 per parameter per token
plus causal attention (2 * layers * heads * head_dim * context per prompt
token; 4 * ... per decoded token).

Board power per GPU is idle plus dynamic parts, each integrated over the time
it is active::

    energy = latency * (idle + p_overhead * g(f))
             + p_compute * s * g(f) * t_compute + p_memory * t_memory
    g(f)   = f * V(f)^2,  V(f) = voltage_floor below voltage_knee_frac, rising
             linearly to 1 at the max clock (DVFS: dynamic power ~ clock x voltage^2)
    power  = energy / latency, capped at TDP

A step whose power would exceed TDP is stretched so it draws TDP with the
same energy (the firmware's power capping lowers clocks). The fitted
parameters (``PhysicsParams``) are per GPU family and shared by every model,
so a model's profile follows from its architecture, not from its own points.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import numpy.typing as npt

from festina_hpc.errors import ProfileError
from festina_hpc.profiles.specs import GpuSpec, ModelSpec

# Fixed constants of the model (documented assumptions, not fitted).
SMOOTH_MAX_K = 4.0  # p-norm of the roofline max: compute and memory overlap imperfectly
SM_SATURATION = 0.4  # SM share at which a memory-bound kernel reaches full HBM bandwidth
ALLREDUCE_LATENCY_S = 10e-6  # per NCCL all-reduce on NVLink, small messages

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PhysicsParams:
    """Fitted per GPU family; every field is shared by all models on that GPU."""

    eff_compute: float  # fraction of peak tensor FLOP/s reached by prefill GEMMs
    eff_memory: float  # fraction of peak HBM bandwidth reached by decode
    step_overhead_s: float  # fixed time per step (scheduler, sampling)
    layer_overhead_s: float  # time per layer per step (kernel launches, synchronisation)
    seq_overhead_s: float  # extra time per sequence per step
    power_compute_w: float  # dynamic power, all SMs compute-bound at max clock
    power_memory_w: float  # dynamic power while streaming HBM at full bandwidth
    power_overhead_w: float  # dynamic power whenever the GPU is busy at all, at max clock
    voltage_floor: float  # core voltage at and below the knee, relative to the voltage at max clock
    voltage_knee_frac: float  # clock (relative to max) below which the voltage stays at its floor
    clock_time_frac: float  # alpha: share of compute time that scales with 1/clock

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


PARAM_NAMES = tuple(f.name for f in fields(PhysicsParams))


def load_params(path: Path) -> dict[str, PhysicsParams]:
    """Read ``calibration.toml``: one table of fitted parameters per GPU type."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read calibration: {exc}") from None
    result: dict[str, PhysicsParams] = {}
    for gpu, entry in raw.items():
        missing = [n for n in PARAM_NAMES if n not in entry]
        if missing:
            raise ProfileError(f"{path}: [{gpu}] is missing field {missing[0]}")
        for name in PARAM_NAMES:
            value = entry[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProfileError(f"{path}: [{gpu}] field {name} must be a number, got {value!r}")
        result[gpu] = PhysicsParams(**{n: float(entry[n]) for n in PARAM_NAMES})
    return result


def clock_power_factor(f: ArrayLike, voltage_floor: float, voltage_knee_frac: float) -> FloatArray:
    """Dynamic power at relative clock ``f`` over dynamic power at max clock: f * V(f)^2."""
    f = np.asarray(f, dtype=np.float64)
    rise = (f - voltage_knee_frac) / (1.0 - voltage_knee_frac)
    voltage = np.where(f <= voltage_knee_frac, voltage_floor, voltage_floor + (1.0 - voltage_floor) * rise)
    return np.asarray(f * voltage**2, dtype=np.float64)


def _flops(model: ModelSpec, phase: str, batch: FloatArray, context: FloatArray) -> FloatArray:
    attn_width = model.heads * model.head_dim
    if phase == "prefill":
        tokens = batch * context
        return 2.0 * model.params_b * 1e9 * tokens + 2.0 * model.layers * attn_width * context * tokens
    return 2.0 * model.params_b * 1e9 * batch + 4.0 * model.layers * attn_width * context * batch


def step(gpu: GpuSpec, model: ModelSpec, tp: int, params: PhysicsParams, phase: str, batch: ArrayLike,
         context: ArrayLike, sm_pct: ArrayLike, clock_mhz: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Latency (s) and per-GPU board power (W) of one step; array arguments broadcast."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase = {phase!r} is not prefill or decode")
    b = np.asarray(batch, dtype=np.float64)
    c = np.asarray(context, dtype=np.float64)
    s = np.asarray(sm_pct, dtype=np.float64) / 100.0
    f = np.asarray(clock_mhz, dtype=np.float64) / gpu.max_clock_mhz
    p = params

    clock_factor = p.clock_time_frac / f + (1.0 - p.clock_time_frac)
    t_compute = _flops(model, phase, b, c) / tp / (gpu.peak_tflops * 1e12 * p.eff_compute * s) * clock_factor
    bytes_moved = (model.weights_bytes + b * c * model.kv_bytes_per_token) / tp
    bandwidth = gpu.memory_bandwidth_gbs * 1e9 * p.eff_memory * np.minimum(1.0, s / SM_SATURATION)
    t_memory = bytes_moved / bandwidth
    t_gpu = (t_compute**SMOOTH_MAX_K + t_memory**SMOOTH_MAX_K) ** (1.0 / SMOOTH_MAX_K)
    if tp > 1:
        tokens = b * c if phase == "prefill" else b
        message_bytes = tokens * model.hidden * 2.0 * 2.0 * (tp - 1) / tp
        t_comm = 2.0 * model.layers * (ALLREDUCE_LATENCY_S + message_bytes / (gpu.interconnect_gbs * 1e9))
    else:
        t_comm = np.zeros_like(t_gpu)
    latency = p.step_overhead_s + p.layer_overhead_s * model.layers + p.seq_overhead_s * b + t_gpu + t_comm

    clock_power = clock_power_factor(f, p.voltage_floor, p.voltage_knee_frac)
    energy = (latency * (gpu.idle_w + p.power_overhead_w * clock_power)
              + p.power_compute_w * s * clock_power * t_compute + p.power_memory_w * t_memory)
    power = energy / latency
    over = power > gpu.tdp_w
    latency = np.where(over, energy / gpu.tdp_w, latency)
    power = np.minimum(power, gpu.tdp_w)
    return np.asarray(latency, dtype=np.float64), np.asarray(power, dtype=np.float64)


def params_table(params: dict[str, PhysicsParams]) -> str:
    """``calibration.toml`` text for fitted parameters."""
    lines = ["# Fitted by `festina profiles calibrate`; see profiles/CALIBRATION.md.", ""]
    for gpu, p in params.items():
        lines.append(f"[{gpu}]")
        lines.extend(f"{name} = {value:.6g}" for name, value in p.as_dict().items())
        lines.append("")
    return "\n".join(lines)

