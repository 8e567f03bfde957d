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


@bench.command("policy")
@click.option("--policy", default="festina", show_default=True)
@click.option("--gpus", "gpu_counts", default="64,1024,8192", show_default=True,
              help="Cluster sizes in GPUs (multiples of 8: 8-GPU H100 nodes).")
@click.option("--decisions", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Timed place() calls per cluster size.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@pass_app
def bench_policy(app: AppContext, policy: str, gpu_counts: str, decisions: int, seed: int, as_json: bool) -> None:
    """Decision cost vs cluster size: place() per call, control() per GPU, consolidate() per plan."""
    from festina_hpc.sim.policy_bench import GPUS_PER_NODE, run_policy_bench

    try:
        counts = [int(n) for n in gpu_counts.split(",")]
    except ValueError:
        raise click.BadParameter(f"{gpu_counts!r} is not a comma-separated list of ints",
                                 param_hint="'--gpus'") from None
    if not counts or any(n <= 0 or n % GPUS_PER_NODE for n in counts):
        raise click.BadParameter(f"{gpu_counts!r}: every size must be a positive multiple of {GPUS_PER_NODE}",
                                 param_hint="'--gpus'")
    result = run_policy_bench(app.profile_store(), policy, counts, decisions, seed)
    if as_json:
        echo_json(result.as_json())
        return
    table = Table(title=f"{result.policy}: decision cost vs cluster size ({decisions:,} placements per size)")
    for column in ("GPUs", "instances", "build s", "decisions/s", "place p50 us", "place p99 us",
                   "place max us", "route/start/drop", "consolidate s", "plan actions"):
        table.add_column(column, justify="right")
    for s in result.sizes:
        mix = f"{s.outcomes['route']}/{s.outcomes['start']}/{s.outcomes['drop']}"
        table.add_row(f"{s.gpus:,}", f"{s.instances:,}", f"{s.build_s:.2f}", f"{s.decisions_per_s:,.0f}",
                      f"{s.p50_us:,.1f}", f"{s.p99_us:,.1f}", f"{s.max_us:,.0f}", mix, f"{s.plan_s:.4f}",
                      str(s.plan_actions))
    Console().print(table)
    click.echo(f"local control at {max(counts):,} GPUs: {result.control_tick_ms:.3f} ms mean, "
               f"{result.control_tick_p99_ms:.3f} ms p99 per control() call, over {result.control_gpus:,} GPUs "
               "holding instances")
    invalid = sum(s.outcomes["invalid start"] + s.outcomes["invalid route"] for s in result.sizes)
    if invalid:
        click.echo(f"invalid decisions (refused by the simulator): {invalid}")


@bench.command("gateway")
@click.option("--requests", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Requests per measurement (one at a time for latency, then concurrently for throughput).")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests in flight for the throughput figures.")
@click.option("--tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tokens per answer from the stub upstream.")
@json_option
def bench_gateway(requests: int, concurrency: int, tokens: int, as_json: bool) -> None:
    """Gateway throughput and added latency (p50/p99) over direct requests, open and requiring an API key."""
    from festina_hpc.daemon.bench import run_gateway_bench

    figures = run_gateway_bench(requests, concurrency, tokens)
    if as_json:
        echo_json(figures)
        return
    table = Table(title=f"Gateway (open, and requiring an API key) vs direct to a stub instance "
                        f"({tokens} tokens per answer)")
    for column in ("mode", "requests", "concurrency", "req/s gateway", "req/s with auth", "auth ratio", "CPU ratio",
                   "req/s direct", "added p50 us", "added p99 us", "added p50 us auth", "added p99 us auth"):
        table.add_column(column, justify="right")
    for row in figures["modes"]:
        table.add_row(row["mode"], f"{row['requests']:,}", str(row["concurrency"]),
                      f"{row['requests_per_s_gateway']:,.0f}", f"{row['requests_per_s_gateway_auth']:,.0f}",
                      f"{row['auth_throughput_ratio']:.3f}", f"{row['auth_cpu_ratio']:.3f}",
                      f"{row['requests_per_s_direct']:,.0f}",
                      f"{row['added_latency_p50_us']:,.0f}", f"{row['added_latency_p99_us']:,.0f}",
                      f"{row['added_latency_p50_us_auth']:,.0f}", f"{row['added_latency_p99_us_auth']:,.0f}")
    Console().print(table)
    click.echo(f"streamed: {figures['req_per_s']:,.0f} req/s through the gateway, {figures['req_per_s_auth']:,.0f} "
               f"with auth (ratio {figures['auth_throughput_ratio']:.3f}; CPU per request ratio "
               f"{figures['auth_cpu_ratio']:.3f}); added latency "
               f"p50 {figures['overhead_p50_ms']:.3f} ms, p99 {figures['overhead_p99_ms']:.3f} ms "
               f"(with auth {figures['overhead_p50_ms_auth']:.3f} ms, {figures['overhead_p99_ms_auth']:.3f} ms); "
               f"key check and admission {figures['auth_cost_us_per_request']:.1f} us per request")


@bench.command("db")
@click.option("--samples", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Energy readings to ingest into each database (128 GPUs, one reading per GPU per second); "
                   "the default takes about a minute on 2 cores, 10,000,000 (a day of 128 GPUs) about ten.")
@click.option("--batch-size", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Readings per ingest transaction.")
@click.option("--postgres-url", default=None, metavar="URL",
              help="PostgreSQL to measure, in a schema of its own that is dropped afterwards (default: "
                   "$FESTINA_BENCH_POSTGRES_URL, else postgresql+psycopg://postgres@127.0.0.1:5432/test).")
@click.option("--no-postgres", is_flag=True, help="SQLite only.")
@json_option
def bench_db(samples: int, batch_size: int, postgres_url: str | None, no_postgres: bool, as_json: bool) -> None:
    """Energy-sample ingest rate into SQLite and PostgreSQL, and the latency of every accounting report.

    Progress goes to stderr (a bar on a terminal, a line every few seconds otherwise)."""
    import os

    from festina_hpc.cli.progress import PhaseProgress
    from festina_hpc.db.bench import DEFAULT_POSTGRES_URL, run_db_bench

    url = None if no_postgres else (postgres_url or os.environ.get("FESTINA_BENCH_POSTGRES_URL")
                                    or DEFAULT_POSTGRES_URL)
    with PhaseProgress("festina bench db") as progress:
        figures = run_db_bench(samples, postgres_url=url, batch_size=batch_size, progress=progress)
    if as_json:
        echo_json(figures)
        return
    table = Table(title=f"Energy ingest, {samples:,} readings of {figures['gpus']} GPUs, "
                        f"batches of {batch_size:,} (rollups included)")
    for column in ("database", "seconds", "samples/s", "slowest report s"):
        table.add_column(column, justify="right")
    for backend in ("sqlite", "postgresql"):
        if figures[f"{backend}_ingest_per_s"] is None:
            continue
        slowest = max(figures["reports_s"][backend].values())
        table.add_row(backend, f"{figures[f'{backend}_ingest_s']:.2f}", f"{figures[f'{backend}_ingest_per_s']:,.0f}",
                      f"{slowest:.4f}")
    Console().print(table)
    click.echo(f"slowest report: {figures['report_max_s']:.4f} s ({figures['report_max_query']}), "
               f"over {len(figures['reports_s'].get('sqlite', {}))} query runs per database")
