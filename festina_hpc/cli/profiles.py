"""``festina profiles``: list, predict from, calibrate and measure profile tables."""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
from festina_hpc.config import GPU_BACKENDS
from festina_hpc.profiles.table import PHASES


@click.group("profiles")
def profiles() -> None:
    """Offline profiles: latency and power per (GPU, model, phase, batch, SM share, clock)."""


@profiles.command("list")
@json_option
@pass_app
def list_profiles(app: AppContext, as_json: bool) -> None:
    """Show the shipped (GPU, model) profiles and their memory footprints."""
    store = app.profile_store()
    rows: list[dict[str, Any]] = []
    for gpu_name, model_name in store.shipped():
        gpu, model = store.gpu(gpu_name), store.model(model_name)
        rows.append({"gpu": gpu_name, "model": model_name, "tp": model.tp_on(gpu_name),
                     "weights_gib_per_gpu": round(model.weights_gib_per_gpu(gpu_name), 2),
                     "kv_kib_per_token": round(model.kv_bytes_per_token / 1024, 1),
                     "max_clock_mhz": gpu.max_clock_mhz, "idle_w": gpu.idle_w, "tdp_w": gpu.tdp_w})
    if as_json:
        echo_json({"profiles_dir": str(store.dir), "profiles": rows})
        return
    console = Console()
    gpus = Table(title=f"GPU types in {store.dir}", box=box.SIMPLE)
    for column in ("gpu", "memory GiB", "idle W", "TDP W", "SM clocks MHz"):
        gpus.add_column(column, justify="left" if column == "gpu" else "right", no_wrap=True)
    for name in sorted({row["gpu"] for row in rows}):
        gpu = store.gpu(name)
        gpus.add_row(name, f"{gpu.memory_gib:g}", f"{gpu.idle_w:g}", f"{gpu.tdp_w:g}",
                     f"{gpu.min_clock_mhz}-{gpu.max_clock_mhz} step {gpu.clock_step_mhz}")
    console.print(gpus)
    models = Table(title="Profiles (GPU type x model)", box=box.SIMPLE)
    for column in ("gpu", "model", "tp", "weights GiB/GPU", "KV KiB/token"):
        models.add_column(column, justify="left" if column in ("gpu", "model") else "right", no_wrap=True)
    for row in rows:
        models.add_row(row["gpu"], row["model"], str(row["tp"]), f"{row['weights_gib_per_gpu']:g}",
                       f"{row['kv_kib_per_token']:g}")
    console.print(models)


@profiles.command("predict")
@click.option("--gpu", required=True, help="GPU type or alias, e.g. h100.")
@click.option("--model", required=True, help="Model name or alias, e.g. llama-3.1-8b.")
@click.option("--phase", type=click.Choice(PHASES), required=True)
@click.option("--batch", type=click.IntRange(min=1), required=True, help="Sequences in the batch.")
@click.option("--context", "context_tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Prompt tokens per sequence (prefill) or KV tokens per sequence (decode).")
@click.option("--sm-pct", type=click.FloatRange(min=0, max=100, min_open=True), default=100.0, show_default=True,
              help="SM share (MPS active-thread percentage).")
@click.option("--clock-mhz", type=click.IntRange(min=1), default=None, help="SM clock [default: GPU max].")
@click.option("--clamp", is_flag=True, default=None, help="Answer at the table edge instead of failing.")
@json_option
@pass_app
def predict(app: AppContext, gpu: str, model: str, phase: str, batch: int, context_tokens: int, sm_pct: float,
            clock_mhz: int | None, clamp: bool | None, as_json: bool) -> None:
    """Predict latency, power and energy per token of one step."""
    result = app.profile_store().predict(gpu, model, phase, batch, context_tokens, sm_pct, clock_mhz,
                                         clamp=clamp or None)
    if as_json:
        echo_json(result.as_dict())
        return
    table = Table(title=f"{result.model} on {result.gpu} (tp={result.tp}): {phase}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in result.as_dict().items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)


@profiles.command("calibrate")
@click.option("--data-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Public measurements to fit [default: the copies shipped in <profiles>/data].")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write tables and CALIBRATION.md [default: the profiles folder].")
@json_option
@pass_app
def calibrate_cmd(app: AppContext, data_dir: Path | None, out_dir: Path | None, as_json: bool) -> None:
    """Fit the analytical model to public measurements and rebuild every shipped table."""
    from festina_hpc.profiles.calibrate import calibrate

    profiles_dir = app.config.profiles.resolved_dir()
    report = calibrate(profiles_dir, data_dir or profiles_dir / "data", out_dir or profiles_dir)
    if as_json:
        echo_json(report.as_dict())
        return
    click.echo(report.markdown_summary())


def _number_list(kind: type[int] | type[float]) -> Any:
    """A click callback parsing "1,8,64" into a list of positive numbers (None stays None)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any] | None:
        if value is None:
            return None
        try:
            numbers = [kind(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}s") from None
        if not numbers or any(n <= 0 for n in numbers):
            raise click.BadParameter(f"{value!r} must list positive numbers")
        return numbers

    return parse


@profiles.command("measure")
@click.option("--gpu-index", type=click.IntRange(min=0), default=0, show_default=True, help="NVML index of the GPU.")
@click.option("--model", required=True, help="Model name or alias whose step shape is measured.")
@click.option("--backend", type=click.Choice(GPU_BACKENDS), default=None,
              help="GPU backend [default: $FESTINA_GPU_BACKEND, else the config's gpu.backend].")
@click.option("--clocks", callback=_number_list(int), default=None,
              help="SM clocks in MHz, comma-separated; snapped to supported clocks [default: the GPU's table clocks].")
@click.option("--sm-pcts", callback=_number_list(float), default="50,100", show_default=True,
              help="SM shares (MPS active-thread percentages), comma-separated; on a real GPU below 100 runs "
                   "under an MPS daemon.")
@click.option("--batches", callback=_number_list(int), default="1,8,64", show_default=True,
              help="Batch sizes, comma-separated.")
@click.option("--contexts", callback=_number_list(int), default="512,2048", show_default=True,
              help="Context tokens, comma-separated.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Profile table to write (CSV, shipped format).")
@json_option
@pass_app
def measure_cmd(app: AppContext, gpu_index: int, model: str, backend: str | None, clocks: list[int] | None,
                sm_pcts: list[float], batches: list[int], contexts: list[int], out: Path, as_json: bool) -> None:
    """Measure a profile table on this node's GPU: lock each clock, run each point, read the energy counter."""
    from festina_hpc.gpu.factory import make_gpu_backend, resolve_backend_name
    from festina_hpc.gpu.mps import NvidiaMps
    from festina_hpc.gpu.simulated import ManualClock
    from festina_hpc.profiles.measure import measure_table, step_runner

    store = app.profile_store()
    override = backend or app.gpu_backend_override
    backend_name = resolve_backend_name(app.config.gpu, override)
    manual_clock = ManualClock()
    gpu_backend = make_gpu_backend(app.config.gpu, store, manual_clock.now, override)
    started_s = time.perf_counter()
    try:
        if gpu_index >= gpu_backend.device_count():
            raise click.BadParameter(f"GPU {gpu_index} does not exist (this node has {gpu_backend.device_count()})",
                                     param_hint="--gpu-index")
        gpu_spec = store.gpu(gpu_backend.info(gpu_index).name)
        model_spec = store.model(model)
        tp = model_spec.tp_on(gpu_spec.name)
        clocks_mhz = clocks or sorted(gpu_spec.table_clocks_mhz)
        used = f"{type(gpu_backend).__name__} (backend {backend_name})"
        command = (f"festina profiles measure --gpu-index {gpu_index} --model {model_spec.name} "
                   f"--backend {backend_name} --clocks {','.join(map(str, clocks_mhz))} "
                   f"--sm-pcts {','.join(f'{v:g}' for v in sm_pcts)} --batches {','.join(map(str, batches))} "
                   f"--contexts {','.join(map(str, contexts))} --out {out}")
        notes = [f"backend: {used}", f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
                 f"command: {command}"]
        with tempfile.TemporaryDirectory(prefix="festina-measure-") as work_dir, \
                step_runner(gpu_backend, gpu_index, model_spec, tp, sm_pcts, manual_clock, NvidiaMps(),
                            Path(work_dir)) as (runner, measuring_clock):
            result = measure_table(gpu_backend, gpu_index, gpu_spec, model_spec, tp, batches, contexts, sm_pcts,
                                   clocks_mhz, runner, measuring_clock, notes)
    finally:
        gpu_backend.close()
    result.table.to_csv(out)
    summary = {"gpu": gpu_spec.name, "model": model_spec.name, "tp": tp, "gpu_index": gpu_index,
               "backend": used, "points": len(result.points), "seconds": round(time.perf_counter() - started_s, 3),
               "measured_s": round(result.measured_s, 6), "out": str(out)}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"measured {summary['points']} points of {model_spec.name} on {gpu_spec.name} "
               f"(GPU {gpu_index}, {used}) in {summary['seconds']:.2f} s "
               f"({result.measured_s:.2f} s of measured runs); wrote {out}")
