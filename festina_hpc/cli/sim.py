"""``festina sim``: run, compare, sweep and bound policies on a trace; ``festina demo``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table

from festina_hpc.cli.common import AppContext, pass_app
from festina_hpc.cli.params import POSITIVE_DURATION
from festina_hpc.cli.progress import PhaseProgress
from festina_hpc.config import POWER_SAVING_MODES
from festina_hpc.policy.base import policy_names
from festina_hpc.sim.experiment import ExperimentOptions, build_experiment
from festina_hpc.sim.simulator import SimResult
from festina_hpc.sim.sweep import DEFAULT_SLO_TARGET, headline, run_sweep, write_sweep

F = TypeVar("F", bound=Callable[..., Any])


def experiment_options(func: F, without: Collection[str] = ()) -> F:
    """The options every ``sim`` command shares (but those named in ``without``); unset ones come
    from the config's [sim]/[cluster]."""
    options = {
        "trace": click.option("--trace", required=True,
                              help="CSV trace (TIMESTAMP, ContextTokens, GeneratedTokens[, model]) or a shipped "
                                   "one: azure-code, azure-conv."),
        "models": click.option("--models", type=click.IntRange(min=1), default=None,
                               help="The first N models of the default mix [config: sim.models]."),
        "model_mix": click.option("--model-mix", default=None,
                                  help="File naming the models, one per line ('name[ = base model][, weight]'), "
                                       "or a shipped mix: eight-on-one-node."),
        "popularity": click.option("--popularity", default=None, help="zipf:S or uniform [config: sim.popularity]."),
        "seed": click.option("--seed", type=int, default=None),
        "rate_scale": click.option("--rate-scale", type=click.FloatRange(min=0, min_open=True), default=None,
                                   help="2.0 replays the trace twice as fast."),
        "duration_s": click.option("--duration-s", type=POSITIVE_DURATION, default=None,
                                   help="Only requests arriving in the first DURATION (seconds or 30m, 2h; "
                                        "after scaling)."),
        "copies": click.option("--copies", type=click.IntRange(min=1), default=1, show_default=True,
                               help="Superpose N copies of the trace (independent model draws): N x the load on "
                                    "the trace's own timeline, where --rate-scale compresses it."),
        "nodes": click.option("--nodes", type=click.IntRange(min=1), default=None),
        "gpus_per_node": click.option("--gpus-per-node", type=click.IntRange(min=1), default=None),
        "gpu": click.option("--gpu", default=None, help="GPU type or alias, e.g. h100 [config: cluster.gpu_type]."),
        "power_saving": click.option("--power-saving", type=click.Choice(POWER_SAVING_MODES), default=None,
                                     help="Slurm's power saving for every policy: 'slurm' suspends a node idle "
                                          "for cluster.suspend_time_s, 'none' keeps idle nodes on "
                                          "[config: cluster.power_saving]."),
        "out_dir": click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                                help="Folder for the results."),
    }
    for name, option in reversed(options.items()):
        if name not in without:
            func = option(func)
    return func


def varied_options(func: F) -> F:
    """The experiment options but those a sweep varies (--seed, --rate-scale)."""
    return experiment_options(func, without=("seed", "rate_scale"))


def _options(kwargs: dict[str, Any]) -> ExperimentOptions:
    return ExperimentOptions(**{k: kwargs[k] for k in ("trace", "models", "model_mix", "popularity", "seed",
                                                        "rate_scale", "duration_s", "nodes", "gpus_per_node",
                                                        "gpu", "copies", "power_saving") if k in kwargs})


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def _policies(spec: str) -> list[str]:
    names = [p.strip() for p in spec.split(",") if p.strip()]
    known = policy_names()
    for name in names:
        if name not in known:
            raise click.BadParameter(f"unknown policy {name!r} (known: {', '.join(known)})",
                                     param_hint="'--policies'")
    return names


@click.group("sim")
def sim() -> None:
    """Trace-driven simulation of policies on a GPU cluster."""


@sim.command("run")
@click.option("--policy", required=True, help="A registered policy name.")
@experiment_options
@pass_app
def run_cmd(app: AppContext, policy: str, out_dir: Path, **kwargs: Any) -> None:
    """Simulate one policy; writes OUT/result.json and OUT/config.json."""
    _policies(policy)
    store = app.profile_store()
    experiment = build_experiment(app.config, store, _options(kwargs))
    result = experiment.run(store, policy)
    experiment.write_config(out_dir)
    _write_json(out_dir / "result.json", result.as_dict())
    click.echo(_one_line(result) + f"; wrote {out_dir / 'result.json'}")


def _one_line(result: SimResult) -> str:
    return (f"{result.policy}: {result.energy_j / 3.6e6:.2f} kWh, {result.energy_per_token_j:.3f} J/token, "
            f"SLO attainment {result.slo_attainment:.3f}, {result.requests_dropped} dropped, "
            f"{result.sim_time_s / max(result.sim_wall_s, 1e-9):,.0f}x real time")


def print_summary(console: Console, results: list[SimResult], bound_j: float) -> None:
    """The comparison's headline figures for a terminal; comparison.md has them all."""
    table = Table(title="Same workload for every policy", box=box.SIMPLE)
    for column in ("policy", "kWh", "J/tok", "x bound", "SLO", "TTFT p99 s", "TBT p99 ms", "drops"):
        table.add_column(column, justify="left" if column == "policy" else "right", no_wrap=column == "policy")
    for r in results:
        table.add_row(r.policy, f"{r.energy_j / 3.6e6:.3f}", f"{r.energy_per_token_j:.3f}",
                      f"{r.energy_j / bound_j:.2f}", f"{r.slo_attainment:.1%}", f"{r.ttft_p99_s:.3f}",
                      f"{1000 * r.tbt_p99_s:.1f}", str(r.requests_dropped))
    table.add_row("lower bound", f"{bound_j / 3.6e6:.3f}", *[""] * 6)
    console.print(table)


def run_comparison(app: AppContext, policies: list[str], options: ExperimentOptions, out_dir: Path,
                   console: Console, slo_target: float = DEFAULT_SLO_TARGET,
                   command: str = "festina sim compare") -> tuple[list[SimResult], Path]:
    from festina_hpc.sim.bound import energy_lower_bound
    from festina_hpc.sim.report import best_baseline, write_comparison

    store = app.profile_store()
    experiment = build_experiment(app.config, store, options)
    experiment.write_config(out_dir)
    results = []
    # On stderr, as the sweep's: a log or CI sees it too, and stdout keeps only the results.
    with PhaseProgress(command, "policies") as progress:
        for done, name in enumerate(policies):
            progress("simulating", done, len(policies))
            results.append(experiment.run(store, name))
        progress("simulating", len(policies), len(policies))
    bound = energy_lower_bound(experiment.requests, store, experiment.cluster, experiment.slos)
    write_comparison(results, bound, out_dir, slo_target)
    print_summary(console, results, bound.energy_j)
    best = best_baseline(results, slo_target)
    console.print(f"Best baseline at SLO attainment >= {slo_target:g}: "
                  + (best.policy if best is not None else "none (no baseline meets it)"), highlight=False)
    return results, out_dir / "comparison.md"


@sim.command("compare")
@click.option("--policies", required=True, help="Comma-separated policy names.")
@click.option("--slo-target", type=click.FloatRange(0.0, 1.0), default=DEFAULT_SLO_TARGET, show_default=True,
              help="SLO attainment a baseline must meet to be the best baseline compared against.")
@experiment_options
@pass_app
def compare_cmd(app: AppContext, policies: str, slo_target: float, out_dir: Path, **kwargs: Any) -> None:
    """Run policies on the identical workload; writes comparison.json, comparison.md and plots.

    The best baseline is the one that spent the least energy of those whose SLO attainment meets
    --slo-target (none when no baseline does)."""
    _, markdown = run_comparison(app, _policies(policies), _options(kwargs), out_dir, Console(), slo_target)
    click.echo(f"wrote {markdown}, comparison.json and plots in {out_dir}")


def _number_list(kind: Callable[[str], Any], param: str, low: float, open_low: bool = False) -> Callable[..., Any]:
    """A click callback parsing "a,b,c" into a list of ``kind``, each at least (or above) ``low``."""
    def parse(ctx: click.Context, p: click.Parameter, text: str) -> list[Any]:
        values = []
        for item in (t.strip() for t in text.split(",")):
            try:
                value = kind(item)
            except ValueError:
                raise click.BadParameter(f"{item!r} is not a number", param_hint=param) from None
            if value < low or (open_low and value == low):
                raise click.BadParameter(f"{item} must be {'above' if open_low else 'at least'} {low:g}",
                                         param_hint=param)
            values.append(value)
        if len(set(values)) != len(values):
            raise click.BadParameter(f"{text!r} repeats a value", param_hint=param)
        return values
    return parse


@sim.command("sweep")
@click.option("--policies", required=True, help="Comma-separated policy names.")
@click.option("--rate-scales", default="0.5,1,2", show_default=True,
              callback=_number_list(float, "'--rate-scales'", 0.0, open_low=True),
              help="Comma-separated trace rate scales (2 replays the trace twice as fast).")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_number_list(int, "'--seeds'", 0),
              help="Comma-separated seeds: each is its own draw of models onto the trace's requests.")
@click.option("--reference", default="vllm", show_default=True,
              help="The policy every energy is divided by, on the same workload.")
@click.option("--slo-target", type=click.FloatRange(0.0, 1.0), default=DEFAULT_SLO_TARGET, show_default=True,
              help="SLO attainment a baseline must meet to be the best baseline at a rate scale, and to set "
                   "the operating scale.")
@click.option("--jobs", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="CPU count",
              help="Runs (one policy on one workload) simulated at once, one process each.")
@varied_options
@pass_app
def sweep_cmd(app: AppContext, policies: str, rate_scales: list[float], seeds: list[int], reference: str,
              slo_target: float, jobs: int, out_dir: Path, **kwargs: Any) -> None:
    """Policies over trace rates and seeds; writes sweep.json, sweep.md, sweep.png and sweep_slo.png.

    At each rate the best baseline is the one with the least energy of those that meet
    --slo-target on average over the seeds; the headline is read at the operating scale, the
    busiest rate that has one."""
    names = _policies(policies)
    if reference not in names:
        raise click.BadParameter(f"{reference!r} is not among --policies", param_hint="'--reference'")
    console = Console()
    runs = len(rate_scales) * len(seeds) * (len(names) + 1)
    done = 0
    # On stderr, so a log or CI sees it too (plain lines there) and stdout keeps only the results.
    with PhaseProgress("festina sim sweep", "runs") as progress:
        def advance() -> None:
            nonlocal done
            done += 1
            progress("simulating", done, runs)

        progress("simulating", 0, runs)
        result = run_sweep(app.config, _options(kwargs), names, rate_scales, seeds, reference, slo_target, jobs,
                           advance=advance)
    paths = write_sweep(result, out_dir)
    table = Table(title=f"Load sweep (x {reference}: same workload, mean over {len(seeds)} seeds)", box=box.SIMPLE)
    for column in ("scale", "policy", "kWh", f"x {reference}", "range", "x best", "x bound", "SLO", "worst", "drops"):
        table.add_column(column, justify="left" if column == "policy" else "right", no_wrap=column == "policy")
    operating = result.operating_scale()
    for s in result.summaries():
        best = result.best_baseline(s.rate_scale) == s.policy
        table.add_row(f"{s.rate_scale:g}" + (" *" if s.rate_scale == operating else ""),
                      s.policy + (" (best)" if best else ""), f"{s.energy_kwh_mean:.3f}", f"{s.x_reference_mean:.3f}",
                      f"{s.x_reference_min:.2f}-{s.x_reference_max:.2f}",
                      "-" if s.x_best_baseline_mean is None else f"{s.x_best_baseline_mean:.3f}",
                      f"{s.x_bound_mean:.2f}",
                      f"{s.slo_mean:.4f}", f"{s.slo_min:.4f}", str(s.dropped))
    console.print(table)
    for line in headline(result):
        console.print(line, highlight=False)
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")


@sim.command("bound")
@experiment_options
@pass_app
def bound_cmd(app: AppContext, out_dir: Path, **kwargs: Any) -> None:
    """A lower bound on the energy any policy that meets every TTFT SLO could spend on the workload;
    writes OUT/bound.json (each term, and how it is proven, in it)."""
    from festina_hpc.sim.bound import energy_lower_bound

    store = app.profile_store()
    experiment = build_experiment(app.config, store, _options(kwargs))
    bound = energy_lower_bound(experiment.requests, store, experiment.cluster, experiment.slos)
    experiment.write_config(out_dir)
    _write_json(out_dir / "bound.json", bound.as_dict())
    terms = ", ".join(f"{name.replace('_', ' ')} {j / 3.6e6:.3f}" for name, j in bound.terms_j.items())
    click.echo(f"lower bound: {bound.energy_j / 3.6e6:.2f} kWh ({terms}); wrote {out_dir / 'bound.json'}")


DEMO_POLICIES = ("vllm", "vllm-autoscale", "serverlessllm", "muxserve", "llumnix", "dynamollm", "festina")


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("festina-demo"),
              show_default=True)
@pass_app
def demo(app: AppContext, out_dir: Path) -> None:
    """A short comparison of every shipped policy on the Azure conv trace (30 minutes, 4 models, 8 GPUs)."""
    known = policy_names()
    policies = [p for p in DEMO_POLICIES if p in known]
    options = ExperimentOptions(trace="azure-conv", models=4, duration_s=1800.0, nodes=1, gpus_per_node=8)
    _, markdown = run_comparison(app, policies, options, out_dir, Console(), command="festina demo")
    click.echo(f"wrote {markdown}, comparison.json and plots in {out_dir}")
