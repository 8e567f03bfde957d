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

A catalogue entry's ``engine_args`` (``festina models add --engine-args``) are
shell words split with ``shlex`` into extra argv words, never run by a shell
(``split_engine_args``): vLLM gets them all, except the flags festina sets from the
plan (``VLLM_MANAGED_FLAGS``, refused); the emulated engine takes the subset it
knows (``EMULATED_ENGINE_FLAGS``) and ignores the rest, so an entry written
for vLLM still runs emulated on a development cluster.

An instance's secret reaches its server as the PATH of a file (mode 0600,
festinad writes it), never as the secret: argv is readable by every user of the
node (``ps``) and the batch script by Slurm's admins. The emulated server reads it
(``--secret-file``); vLLM takes its key from ``VLLM_API_KEY``, which
``keyed_argv`` sets from the file just before it execs vLLM (``python -m
festina_hpc.serve.launch --secret-file PATH -- vllm serve ...``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from festina_hpc.cluster.figures import USABLE_MEMORY_FRAC
from festina_hpc.errors import FestinaError
from festina_hpc.profiles.store import ProfileStore

ENGINES = ("emulated", "simulated", "vllm")  # "simulated" is the old name of "emulated"
# vLLM flags festina sets from the plan and the port it picks: an entry's engine_args may not set them.
VLLM_MANAGED_FLAGS = ("--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp",
                      "--max-num-seqs", "--gpu-memory-utilization")
# `festina serve --engine emulated` flags an entry's engine_args may set (each takes one value).
EMULATED_ENGINE_FLAGS = ("--chunk-tokens", "--drain-s")


class EngineArgsError(FestinaError):
    """An entry's engine_args cannot be split into words, or set what festina sets itself."""

    def __init__(self, text: str, what: str):
        super().__init__(f"engine_args = {text!r} {what}")
        self.what = what  # e.g. "sets --port, which festina sets itself"


def _flag(word: str) -> str:
    """``--max_num_seqs=8`` -> ``--max-num-seqs`` (vLLM's parser takes either spelling)."""
    return word.split("=", 1)[0].replace("_", "-") if word.startswith("-") else ""


def split_engine_args(text: str, engine: str) -> tuple[str, ...]:
    """The words of ``text`` that ``engine`` gets (see the module docstring); ``EngineArgsError`` when
    ``text`` is not shell words (an unbalanced quote) or sets a flag festina manages."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise EngineArgsError(text, f"is not valid shell words ({exc})") from None
    managed = sorted({_flag(w) for w in words} & set(VLLM_MANAGED_FLAGS))
    if managed:
        raise EngineArgsError(text, f"sets {', '.join(managed)}, which festina sets itself")
    if engine == "vllm":
        return tuple(words)
    kept: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if _flag(word) in EMULATED_ENGINE_FLAGS:
            if "=" in word:
                kept.append(word)
            elif i + 1 < len(words):
                kept += [word, words[i + 1]]
                i += 1
        i += 1
    return tuple(kept)


def unknown_emulated_args(text: str) -> list[str]:
    """The flags of ``text`` the emulated engine ignores (``festina models add`` refuses them for an
    emulated entry)."""
    words = shlex.split(text)
    known = set(split_engine_args(text, "emulated"))
    return [w for w in words if w.startswith("-") and w not in known]


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
    engine_args: str = ""  # the catalogue entry's extra engine arguments, shell words (see split_engine_args())
    secret_file: str = ""  # the file holding the instance's secret ("" = an open server); its path, never the secret


def serve_spec(store: ProfileStore, model: str, gpu_type: str, port: int, *, host: str = "0.0.0.0",
               sm_pct: float = 100.0, clock_mhz: int = 0, batch_cap: int = 256,
               memory_fraction: float = 1.0, engine_args: str = "", secret_file: str = "") -> ServeSpec:
    m, g = store.model(model), store.gpu(gpu_type)
    return ServeSpec(model=m.name, hf_name=m.hf_name, gpu_type=g.name, port=port, host=host, tp=m.tp_on(g.name),
                     sm_pct=sm_pct, clock_mhz=clock_mhz, batch_cap=batch_cap, memory_fraction=memory_fraction,
                     engine_args=engine_args, secret_file=secret_file)


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
    if spec.secret_file:
        argv += ["--secret-file", spec.secret_file]
    return argv + list(split_engine_args(spec.engine_args, "emulated"))


def vllm_argv(spec: ServeSpec, vllm: str = "vllm", python: str = sys.executable) -> list[str]:
    """``vllm serve``; with a secret file, behind ``keyed_argv``'s wrapper (run by ``python``)."""
    argv = [vllm, "serve", spec.hf_name, "--served-model-name", spec.model, "--host", spec.host,
            "--port", str(spec.port), "--tensor-parallel-size", str(spec.tp), "--max-num-seqs", str(spec.batch_cap),
            "--gpu-memory-utilization", f"{spec.memory_fraction * USABLE_MEMORY_FRAC:.4g}",
            *split_engine_args(spec.engine_args, "vllm")]
    return keyed_argv(spec.secret_file, argv, python) if spec.secret_file else argv


def keyed_argv(secret_file: str, argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """``argv`` run with ``VLLM_API_KEY`` read from ``secret_file`` (see ``main``)."""
    return [python, "-m", "festina_hpc.serve.launch", "--secret-file", secret_file, "--", *argv]


def main(args: Sequence[str] | None = None) -> None:
    """``--secret-file PATH -- PROGRAM ARGS...``: exec PROGRAM with ``VLLM_API_KEY`` set from the file.

    The environment of a process is readable only by its user and root, unlike its argv."""
    from festina_hpc.serve.secret import read_secret_file

    words = list(sys.argv[1:] if args is None else args)
    if len(words) < 4 or words[0] != "--secret-file" or words[2] != "--":
        raise SystemExit("usage: python -m festina_hpc.serve.launch --secret-file PATH -- PROGRAM [ARGS...]")
    try:
        os.environ["VLLM_API_KEY"] = read_secret_file(words[1])
    except FestinaError as exc:
        raise SystemExit(f"error: {exc}") from None
    sys.stdout.flush()
    os.execvp(words[3], words[3:])


def serving_argv(spec: ServeSpec, engine: str) -> list[str]:
    """The serving job's command for ``engine`` ("emulated" or "vllm")."""
    if engine in ("emulated", "simulated"):
        return simulated_argv(spec)
    if engine == "vllm":
        return vllm_argv(spec)
    raise FestinaError(f"engine = {engine!r} is not one of {', '.join(ENGINES)}")


if __name__ == "__main__":
    main()
