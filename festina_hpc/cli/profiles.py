"""``festina profiles``: list, predict from, calibrate and measure profile tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app
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
