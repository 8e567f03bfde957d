"""Load sweeps: policies compared over trace rates and seeds, not at one point.

``/work/shared/notes/evaluation-method.md`` asks for curves: the trace's rate
scaled up to where the best baseline no longer meets 0.99 SLO attainment, and
headline figures as a mean and spread over seeds. ``run_sweep`` runs every
policy on every (rate scale, seed) workload, exactly as ``festina sim
compare`` runs one (same requests, SLOs, cluster and profiles for every
policy of a cell), plus that workload's lower bound. Energy relative to the
reference policy is taken per cell, side by side, and then averaged over
seeds. At each rate scale the *best baseline* follows the comparison's rule
(``festina_hpc.sim.report``): the baseline with the least mean energy of those
whose mean SLO attainment over the seeds meets the target, or none. The
*operating scale* is the busiest rate at which a baseline still meets the
target: where "the baselines are busy but meet SLOs", and where a headline
saving is read, against that scale's best baseline.

Cells run in worker processes (``jobs``), each building its own profile store
and workload from the config, so a sweep on N cores takes about 1/N the time.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from festina_hpc.config import Config
from festina_hpc.sim.experiment import ExperimentOptions, build_experiment
from festina_hpc.sim.report import DEFAULT_SLO_TARGET, J_PER_KWH, is_baseline

__all__ = ["DEFAULT_SLO_TARGET", "Point", "Summary", "Sweep", "headline", "run_sweep", "sweep_markdown",
           "write_sweep"]


@dataclass(frozen=True)
class Point:
    """One policy's run of one (rate scale, seed) workload."""

    rate_scale: float
    seed: int
    policy: str
    energy_j: float
    slo_attainment: float
    requests_dropped: int
    energy_parts_j: dict[str, float]


@dataclass(frozen=True)
class Summary:
    """One policy at one rate scale, over the seeds."""

    rate_scale: float
    policy: str
    energy_kwh_mean: float
    energy_kwh_min: float
    energy_kwh_max: float
    x_reference_mean: float  # energy over the reference policy's on the same workload, then averaged
    x_reference_min: float
    x_reference_max: float
    x_bound_mean: float
    slo_mean: float
    slo_min: float
    dropped: int  # over all seeds
    # Energy over this scale's best baseline's on the same workload, then averaged; None without one.
    x_best_baseline_mean: float | None = None


@dataclass(frozen=True)
class Sweep:
    points: list[Point]
    bounds_j: dict[tuple[float, int], float]  # (rate scale, seed) -> lower bound
    reference: str
    slo_target: float
    workload: dict[str, Any]  # the resolved config of the first cell, less its rate scale and seed

    @property
    def rate_scales(self) -> list[float]:
        return sorted({p.rate_scale for p in self.points})

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(p.policy for p in self.points))

    def best_baseline(self, scale: float) -> str | None:
        """At ``scale``: the baseline with the least mean energy of those whose mean SLO attainment meets
        the target, or None."""
        met = []
        for policy in self.policies:
            cell = [p for p in self.points if p.rate_scale == scale and p.policy == policy]
            if cell and is_baseline(policy) and _mean([p.slo_attainment for p in cell]) >= self.slo_target:
                met.append((_mean([p.energy_j for p in cell]), policy))
        return min(met)[1] if met else None

    def summaries(self) -> list[Summary]:
        energy = {(p.rate_scale, p.seed, p.policy): p.energy_j for p in self.points}
        rows = []
        for scale in self.rate_scales:
            best = self.best_baseline(scale)
            for policy in self.policies:
                cell = [p for p in self.points if p.rate_scale == scale and p.policy == policy]
                kwh = [p.energy_j / J_PER_KWH for p in cell]
                ratios = [p.energy_j / energy[scale, p.seed, self.reference] for p in cell]
                bounds = [p.energy_j / self.bounds_j[scale, p.seed] for p in cell]
                slos = [p.slo_attainment for p in cell]
                x_best = None if best is None else _mean([p.energy_j / energy[scale, p.seed, best] for p in cell])
                rows.append(Summary(scale, policy, _mean(kwh), min(kwh), max(kwh), _mean(ratios), min(ratios),
                                    max(ratios), _mean(bounds), _mean(slos), min(slos),
                                    sum(p.requests_dropped for p in cell), x_best))
        return rows

    def operating_scale(self) -> float | None:
        """The largest rate scale with a best baseline: one whose mean SLO attainment meets the target."""
        return max((s for s in self.rate_scales if self.best_baseline(s) is not None), default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "slo_target": self.slo_target,
            "operating_rate_scale": self.operating_scale(), "workload": self.workload,
            "best_baseline": [{"rate_scale": s, "policy": self.best_baseline(s)} for s in self.rate_scales],
            "summary": [dataclasses.asdict(s) for s in self.summaries()],
            "bounds_j": [{"rate_scale": s, "seed": seed, "energy_j": e} for (s, seed), e in self.bounds_j.items()],
            "points": [dataclasses.asdict(p) for p in self.points],
        }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _cell(config: Config, options: ExperimentOptions, policy: str | None) -> Point | float:
    """A policy's run of one workload, or (``policy`` None) the workload's lower bound. Runs in a
    worker process: everything it needs is built here from picklable arguments."""
    from festina_hpc.sim.bound import energy_lower_bound

    store = config.profiles.open_store()
    experiment = build_experiment(config, store, options)
    if policy is None:
        return energy_lower_bound(experiment.requests, store, experiment.cluster, experiment.slos).energy_j
    r = experiment.run(store, policy)
    assert options.rate_scale is not None and options.seed is not None
    return Point(options.rate_scale, options.seed, policy, r.energy_j, r.slo_attainment, r.requests_dropped,
                 dict(r.energy_parts_j))


def run_sweep(config: Config, options: ExperimentOptions, policies: Sequence[str], rate_scales: Sequence[float],
              seeds: Sequence[int], reference: str, slo_target: float = DEFAULT_SLO_TARGET, jobs: int = 1,
              advance: Callable[[], None] = lambda: None) -> Sweep:
    """Every policy (and the lower bound) on every (rate scale, seed) workload; ``advance`` is
    called as each of the len(rate_scales) x len(seeds) x (len(policies) + 1) cells finishes."""
    if reference not in policies:
        raise ValueError(f"reference = {reference!r} is not among the policies ({', '.join(policies)})")
    cells = [(dataclasses.replace(options, rate_scale=scale, seed=seed), policy)
             for scale in rate_scales for seed in seeds for policy in [*policies, None]]
    # Bad input fails here, at once.
    workload = dict(build_experiment(config, config.profiles.open_store(), cells[0][0]).resolved)
    for key in ("rate_scale", "seed", "requests"):
        workload.pop(key, None)
    outcomes: dict[tuple[ExperimentOptions, str | None], Point | float] = {}
    if jobs <= 1:
        for cell_options, policy in cells:
            outcomes[cell_options, policy] = _cell(config, cell_options, policy)
            advance()
    else:
        # spawn: a worker starts clean rather than with a copy of this process's state and threads.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_cell, config, o, p): (o, p) for o, p in cells}
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                advance()
    points = [v for (_, p), v in outcomes.items() if p is not None and isinstance(v, Point)]
    points.sort(key=lambda p: (p.rate_scale, p.seed, policies.index(p.policy)))
    bounds = {(o.rate_scale, o.seed): float(v) for (o, p), v in outcomes.items()
              if p is None and isinstance(v, float) and o.rate_scale is not None and o.seed is not None}
    return Sweep(points, bounds, reference, slo_target, workload)


# -- reports ----------------------------------------------------------------------------------


def headline(sweep: Sweep) -> list[str]:
    """At the operating scale: each Festina variant's energy relative to the best baseline, the
    reference and each other baseline, and its SLO attainment beside the best baseline's (one line each)."""
    scale = sweep.operating_scale()
    if scale is None:
        return [f"No rate scale where a baseline meets SLO attainment {sweep.slo_target:g} on average: "
                "no operating point (try lower rate scales)."]
    best = sweep.best_baseline(scale)
    rows = [s for s in sweep.summaries() if s.rate_scale == scale]
    baselines = [s for s in rows if is_baseline(s.policy)]
    best_row = next(s for s in rows if s.policy == best)
    lines = [f"Operating rate scale {scale:g}: the busiest at which a baseline meets SLO attainment "
             f"{sweep.slo_target:g} on average over the seeds; best baseline there: {best} (the least energy of "
             f"those that meet it)."]
    by_seed = {(p.seed, p.policy): p.energy_j for p in sweep.points if p.rate_scale == scale}
    seeds = sorted({seed for seed, _ in by_seed})
    for s in rows:
        if is_baseline(s.policy):
            continue
        others = [b.policy for b in baselines if b.policy not in (best, sweep.reference)]
        versus = "".join(f", {_mean([by_seed[seed, s.policy] / by_seed[seed, b] for seed in seeds]):.3f}x {b}"
                         for b in [sweep.reference, *others] if b != best)
        lines.append(f"{s.policy}: {s.x_best_baseline_mean:.3f}x {best}{versus} ({len(seeds)} seeds; "
                     f"{s.x_reference_min:.3f}-{s.x_reference_max:.3f}x {sweep.reference}); SLO {s.slo_mean:.4f} "
                     f"(min {s.slo_min:.4f}) vs {best_row.slo_mean:.4f} for {best}; {s.x_bound_mean:.2f}x the "
                     "lower bound.")
    return lines


def sweep_markdown(sweep: Sweep) -> str:
    seeds = sorted({p.seed for p in sweep.points})
    lines = ["# Load sweep", "",
             f"Rate scales {', '.join(f'{s:g}' for s in sweep.rate_scales)}; seeds {', '.join(map(str, seeds))}; "
             f"every policy ran on the same workload per (rate scale, seed). x {sweep.reference}: energy over "
             f"{sweep.reference}'s on the same workload, averaged over the seeds (min-max in brackets). SLO: "
             "share of requests within both TTFT and TBT SLOs (drops are misses), mean over seeds (min). Best "
             f"baseline at a rate scale: the least mean energy of the baselines whose mean SLO meets "
             f"{sweep.slo_target:g} (none when no baseline does).", ""]
    lines += ["## Headline", "", *(f"- {line}" for line in headline(sweep)), ""]
    header = ["rate scale", "policy", "kWh mean (min-max)", f"x {sweep.reference} (min-max)", "x best baseline",
              "x bound", "SLO (min)", "dropped"]
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    operating = sweep.operating_scale()
    for s in sweep.summaries():
        mark = " (operating)" if s.rate_scale == operating else ""
        name = f"**{s.policy}** (best baseline)" if s.policy == sweep.best_baseline(s.rate_scale) else s.policy
        x_best = "-" if s.x_best_baseline_mean is None else f"{s.x_best_baseline_mean:.3f}"
        lines.append(f"| {s.rate_scale:g}{mark} | {name} | {s.energy_kwh_mean:.3f} ({s.energy_kwh_min:.3f}-"
                     f"{s.energy_kwh_max:.3f}) | {s.x_reference_mean:.3f} ({s.x_reference_min:.3f}-"
                     f"{s.x_reference_max:.3f}) | {x_best} | {s.x_bound_mean:.2f} | {s.slo_mean:.4f} "
                     f"({s.slo_min:.4f}) | {s.dropped} |")
    return "\n".join(lines) + "\n"


def write_sweep(sweep: Sweep, out_dir: Path) -> list[Path]:
    """sweep.json (``Sweep.as_dict``), sweep.md, sweep.png (energy and SLO against the rate) and
    sweep_slo.png (energy against SLO attainment)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "sweep.json", out_dir / "sweep.md", out_dir / "sweep.png"]
    paths[0].write_text(json.dumps(sweep.as_dict(), indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(sweep_markdown(sweep), encoding="utf-8")
    fig = Figure(figsize=(11.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    energy_ax, slo_ax = fig.subplots(1, 2)
    summaries = sweep.summaries()
    for policy in sweep.policies:
        rows = [s for s in summaries if s.policy == policy]
        xs = [s.rate_scale for s in rows]
        energy_ax.errorbar(xs, [s.x_reference_mean for s in rows],
                           yerr=[[s.x_reference_mean - s.x_reference_min for s in rows],
                                 [s.x_reference_max - s.x_reference_mean for s in rows]],
                           marker="o", capsize=3, label=policy)
        slo_ax.plot(xs, [100.0 * s.slo_mean for s in rows], marker="o", label=policy)
    operating = sweep.operating_scale()
    for ax in (energy_ax, slo_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep.rate_scales, [f"{x:g}" for x in sweep.rate_scales])
        ax.minorticks_off()
        ax.set_xlabel("trace rate scale")
        ax.grid(True, alpha=0.3)
        if operating is not None:
            ax.axvline(operating, color="black", linestyle=":", linewidth=1.0)
    energy_ax.set_ylabel(f"energy (x {sweep.reference}, same workload)")
    energy_ax.set_title("Energy against load (mean, min-max over seeds)")
    slo_ax.axhline(100.0 * sweep.slo_target, color="black", linestyle="--", linewidth=1.0)
    slo_ax.set_ylabel("requests within SLO (%)")
    slo_ax.set_title("SLO attainment against load (mean over seeds)")
    slo_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.savefig(paths[2], dpi=120)
    paths.append(_energy_against_slo(sweep, out_dir / "sweep_slo.png"))
    return paths


def _energy_against_slo(sweep: Sweep, path: Path) -> Path:
    """Each policy's mean energy (over the reference's) against its mean SLO attainment, a point per
    rate scale labelled with it, and the target as a vertical line: a saving left of it is bought
    with missed SLOs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    summaries = sweep.summaries()
    for policy in sweep.policies:
        rows = [s for s in summaries if s.policy == policy]
        xs = [100.0 * s.slo_mean for s in rows]
        ys = [s.x_reference_mean for s in rows]
        ax.plot(xs, ys, marker="o" if is_baseline(policy) else "s", linestyle="-", linewidth=0.8, label=policy)
        for s, x, y in zip(rows, xs, ys):
            ax.annotate(f"{s.rate_scale:g}x", (x, y), xytext=(4, 3), textcoords="offset points", fontsize="x-small")
    ax.axvline(100.0 * sweep.slo_target, color="black", linestyle="--", linewidth=1.0,
               label=f"SLO target {100.0 * sweep.slo_target:g}%")
    ax.set_xlabel("requests within SLO (%, mean over seeds)")
    ax.set_ylabel(f"energy (x {sweep.reference}, same workload)")
    ax.set_title("Energy against SLO attainment (points: trace rate scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.savefig(path, dpi=120)
    return path
