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


@bench.command("sim")
@click.option("--policy", default="vllm", show_default=True)
@click.option("--nodes", "node_counts", default="1,4,16,64", show_default=True,
              help="Cluster sizes (8 GPUs per node) for the cost-per-request scaling.")
@click.option("--models", type=click.IntRange(min=1), default=4, show_default=True)
@json_option
@pass_app
def bench_sim(app: AppContext, policy: str, node_counts: str, models: int, as_json: bool) -> None:
    """Simulator speed: real-time factor on the 1-hour Azure conv trace, cost per request vs cluster size."""
    from festina_hpc.sim.bench import run_sim_bench

    try:
        counts = [int(n) for n in node_counts.split(",")]
    except ValueError:
        raise click.BadParameter(f"{node_counts!r} is not a comma-separated list of ints",
                                 param_hint="'--nodes'") from None
    figures = run_sim_bench(app.config, app.profile_store(), policy, counts, models)
    if as_json:
        echo_json(figures)
        return
    click.echo(f"{figures['policy']} on the 1-hour Azure conv trace ({figures['requests']:,} requests, "
               f"{figures['models']} models, 8 GPUs): {figures['sim_wall_s']:.2f} s wall, "
               f"{figures['realtime_factor']:,.0f}x faster than real time")
    table = Table(title=f"Cost per simulated request vs cluster size ({figures['scaling_duration_s']:g} s of "
                        "the trace, one copy per node)")
    for column in ("nodes", "GPUs", "requests", "wall s", "us/request", "events", "SLO attainment"):
        table.add_column(column, justify="right")
    for row in figures["scaling"]:
        table.add_row(str(row["nodes"]), str(row["gpus"]), f"{row['requests']:,}", f"{row['wall_s']:.2f}",
                      f"{row['us_per_request']:.1f}", f"{row['events']:,}", f"{row['slo_attainment']:.3f}")
    Console().print(table)
    click.echo(f"us/request, largest over smallest: {figures['us_per_request_max_over_min']:.2f}")
