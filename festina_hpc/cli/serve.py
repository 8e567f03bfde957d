"""``festina serve``: run one model server (OpenAI-compatible) until SIGTERM or Ctrl-C: the program of a serving job.

``--engine emulated`` (alias ``--simulated``) serves the profile-paced
emulated engine in this process; ``--engine vllm`` replaces this process with
``vllm serve`` (``serve/launch.py`` builds its argv), so Slurm's signals reach
vLLM directly.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from festina_hpc.cli.common import AppContext, pass_app
from festina_hpc.cli.params import DURATION


@click.command("serve")
@click.option("--model", required=True, help="Model name or alias (festina profiles list).")
@click.option("--gpu-type", required=True, help="GPU type whose profile paces the engine, e.g. h100.")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="TCP port; 0 picks a free one.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 in a Slurm job).")
@click.option("--sm-pct", type=click.FloatRange(0, 100, min_open=True), default=100.0, show_default=True,
              help="SM share (MPS active-thread percentage) to pace at.")
@click.option("--clock-mhz", type=click.IntRange(min=0), default=0, help="SM clock to pace at [default: max].")
@click.option("--batch-cap", type=click.IntRange(min=1), default=256, show_default=True,
              help="Max sequences batched at once.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Prompt tokens one step may prefill (chunked prefill; the emulated engine).")
@click.option("--engine", type=click.Choice(["emulated", "vllm"]), default="emulated", show_default=True,
              help="emulated: the profile-paced engine (no GPU); vllm: exec `vllm serve` on the allocated GPU.")
@click.option("--simulated", is_flag=True, default=False, help="Alias of --engine emulated.")
@click.option("--memory-fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Share of the GPU's usable memory (vLLM's --gpu-memory-utilization; ignored when emulated).")
@click.option("--time-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply every step's predicted latency (tests and demos; 1 = real time).")
@click.option("--drain-s", type=DURATION, default=5.0, show_default=True,
              help="On SIGTERM, time in-flight requests get to finish: seconds or 1m (keep below Slurm's KillWait).")
@click.option("--secret-file", default=None, metavar="PATH",
              help="File (mode 600) holding this instance's secret: /v1/*, /admin/settings and /metrics then "
                   "answer only `Authorization: Bearer <secret>` (festinad writes one per job). "
                   "[default: none, open to anyone who reaches the port]")
@pass_app
def serve(app: AppContext, model: str, gpu_type: str, port: int, host: str, sm_pct: float, clock_mhz: int,
          batch_cap: int, chunk_tokens: int, engine: str, simulated: bool, memory_fraction: float,
          time_scale: float, drain_s: float, secret_file: str | None) -> None:
    """Serve MODEL with the OpenAI completions API, paced by its profile on GPU_TYPE."""
    from festina_hpc.serve.secret import read_secret_file

    # Read before anything starts: a bad file is a one-line error, not a server left open.
    secret = read_secret_file(secret_file) if secret_file else None
    if engine == "vllm" and not simulated:
        _exec_vllm(app, model, gpu_type, port, host, sm_pct, clock_mhz, batch_cap, memory_fraction, secret)
        return
    _serve_emulated(app, model, gpu_type, port, host, sm_pct, clock_mhz, batch_cap, chunk_tokens, time_scale,
                    drain_s, secret)


def _exec_vllm(app: AppContext, model: str, gpu_type: str, port: int, host: str, sm_pct: float, clock_mhz: int,
               batch_cap: int, memory_fraction: float, secret: str | None) -> None:
    import os
    import shutil

    from festina_hpc.errors import FestinaError
    from festina_hpc.serve.launch import serve_spec, vllm_argv

    spec = serve_spec(app.profile_store(), model, gpu_type, port, host=host, sm_pct=sm_pct, clock_mhz=clock_mhz,
                      batch_cap=batch_cap, memory_fraction=memory_fraction)
    argv = vllm_argv(spec)
    if shutil.which(argv[0]) is None:
        raise FestinaError("--engine vllm: `vllm` is not on PATH in this job (pip install vllm on the node)")
    if secret:
        # vLLM's API key from its environment (only the job's user and root can read it), never --api-key:
        # argv is world-readable in ps.
        os.environ["VLLM_API_KEY"] = secret
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # SM share and clock reach vLLM through MPS and the node controller, not flags


def _serve_emulated(app: AppContext, model: str, gpu_type: str, port: int, host: str, sm_pct: float, clock_mhz: int,
                    batch_cap: int, chunk_tokens: int, time_scale: float, drain_s: float,
                    secret: str | None) -> None:
    from festina_hpc.serve.engine import EngineSettings, SimulatedEngine
    from festina_hpc.serve.server import run_server

    engine = SimulatedEngine(app.profile_store(), model, gpu_type,
                             EngineSettings(sm_pct=sm_pct, clock_mhz=clock_mhz, batch_cap=batch_cap,
                                            chunk_tokens=chunk_tokens),
                             time_scale=time_scale)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            click.echo(f"festina serve: {url} ({engine.model} on {engine.gpu_type}, simulated engine)")
            sys.stdout.flush()  # a job script or a test reads the URL while the server runs

        await run_server(engine, host, port, stop, ready, drain_s=drain_s, secret=secret)
        click.echo("festina serve: stopped")

    try:
        asyncio.run(main())
    except OSError as exc:
        from festina_hpc.errors import FestinaError
        raise FestinaError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
