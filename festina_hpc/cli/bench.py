"""``festina bench``: benchmarks that print figures (a table, or one JSON object with --json)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from festina_hpc.cli.common import AppContext, echo_json, json_option, pass_app


@click.group("bench")
def bench() -> None:
    """Benchmarks that print figures."""


@bench.command("profiles")
@click.option("--gpu", default="h100-sxm-80gb", show_default=True)
@click.option("--model", default="llama-3.1-8b", show_default=True)
@click.option("--queries", type=click.IntRange(min=1000), default=200_000, show_default=True,
              help="Lookups per measurement.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--processes/--no-processes", default=True, show_default=True,
              help="Also time one `festina profiles predict` process per shipped (GPU, model) pair.")
@json_option
@pass_app
def bench_profiles(app: AppContext, gpu: str, model: str, queries: int, seed: int, processes: bool,
                   as_json: bool) -> None:
    """Profile lookups per second (vectorised and one at a time) and predict time per process."""
    from festina_hpc.profiles.bench import run_lookup_bench, run_predict_process_bench

    store = app.profile_store()
    figures = run_lookup_bench(store, gpu, model, queries, seed)
    if processes:
        figures.update(run_predict_process_bench(store))
    if as_json:
        echo_json(figures)
        return
    table = Table(title=f"Profile lookups, {figures['model']} on {figures['gpu']}")
    table.add_column("mode")
    table.add_column("lookups", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("lookups/s", justify="right")
    for mode in ("vectorised", "single"):
        table.add_row(mode, f"{figures[f'queries_{mode}']:,}", f"{figures[f'seconds_{mode}']:.3f}",
                      f"{figures[f'lookups_per_s_{mode}']:,.0f}")
    Console().print(table)
    click.echo(f"table load: {figures['table_load_s'] * 1000:.1f} ms")
    if processes:
        click.echo(f"festina profiles predict, {figures['predict_processes']} (GPU, model) pairs: "
                   f"median {figures['predict_process_s_median']:.2f} s, max {figures['predict_process_s_max']:.2f} s "
                   f"per process ({figures['predict_process_s_slowest_pair']})")
