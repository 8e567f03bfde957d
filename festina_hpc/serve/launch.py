"""The command line of a serving job: the simulated server or vLLM, as an argv list (never a shell string).

A serving job (one model instance, ``sbatch --gres=mps:K`` per DESIGN.md)
runs one of two engines behind the same OpenAI-compatible API:

- ``festina serve --engine emulated ...``: the profile-paced simulated engine, on
  machines without a GPU (development, CI, the local Slurm cluster);
- ``vllm serve <hf_name> --served-model-name <name> ...``: the real engine.

The SM share reaches vLLM through ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``,
which Slurm sets from ``--gres=mps:K``, and the clock is locked by the node
controller through NVML; neither is a vLLM flag. The batch cap maps to
``--max-num-seqs`` and the instance's memory fraction to
``--gpu-memory-utilization`` (vLLM's fraction of the whole GPU). The Slurm
submit (another module) wraps one of these argv lists in its batch script.
"""

from __future__ import annotations

from dataclasses import dataclass

from festina_hpc.errors import FestinaError
from festina_hpc.profiles.store import ProfileStore

ENGINES = ("emulated", "simulated", "vllm")  # "simulated" is the old name of "emulated"
USABLE_MEMORY_FRAC = 0.9  # of a GPU for weights and KV cache: vLLM's default gpu_memory_utilization


@dataclass(frozen=True)
class ServeSpec:
    """One instance to serve, with names already resolved through the catalog."""

    model: str  # festina's model name: what clients and the gateway ask for
    hf_name: str  # what vLLM loads
    gpu_type: str
    port: int
    host: str = "0.0.0.0"  # a serving job is reached from the head node
    tp: int = 1
    sm_pct: float = 100.0
    clock_mhz: int = 0  # 0: the GPU's max clock
    batch_cap: int = 256
    memory_fraction: float = 1.0  # of the GPU's usable memory, as in StartInstance


def serve_spec(store: ProfileStore, model: str, gpu_type: str, port: int, *, host: str = "0.0.0.0",
               sm_pct: float = 100.0, clock_mhz: int = 0, batch_cap: int = 256,
               memory_fraction: float = 1.0) -> ServeSpec:
    m, g = store.model(model), store.gpu(gpu_type)
    return ServeSpec(model=m.name, hf_name=m.hf_name, gpu_type=g.name, port=port, host=host, tp=m.tp_on(g.name),
                     sm_pct=sm_pct, clock_mhz=clock_mhz, batch_cap=batch_cap, memory_fraction=memory_fraction)


def simulated_argv(spec: ServeSpec, festina: str | list[str] = "festina", time_scale: float = 1.0) -> list[str]:
    """``festina serve --engine emulated``; ``festina`` is the program (or an argv prefix such as
    ``[sys.executable, "-m", "festina_hpc.cli.main"]``, which needs no ``festina`` on a node's PATH)."""
    prefix = [festina] if isinstance(festina, str) else list(festina)
    argv = [*prefix, "serve", "--engine", "emulated", "--model", spec.model, "--gpu-type", spec.gpu_type,
            "--host", spec.host, "--port", str(spec.port), "--sm-pct", f"{spec.sm_pct:g}",
            "--batch-cap", str(spec.batch_cap)]
    if spec.clock_mhz:
        argv += ["--clock-mhz", str(spec.clock_mhz)]
    if time_scale != 1.0:
        argv += ["--time-scale", f"{time_scale:g}"]
    return argv


def vllm_argv(spec: ServeSpec, vllm: str = "vllm") -> list[str]:
    return [vllm, "serve", spec.hf_name, "--served-model-name", spec.model, "--host", spec.host,
            "--port", str(spec.port), "--tensor-parallel-size", str(spec.tp), "--max-num-seqs", str(spec.batch_cap),
            "--gpu-memory-utilization", f"{spec.memory_fraction * USABLE_MEMORY_FRAC:.4g}"]


def serving_argv(spec: ServeSpec, engine: str) -> list[str]:
    """The serving job's command for ``engine`` ("emulated" or "vllm")."""
    if engine in ("emulated", "simulated"):
        return simulated_argv(spec)
    if engine == "vllm":
        return vllm_argv(spec)
    raise FestinaError(f"engine = {engine!r} is not one of {', '.join(ENGINES)}")
