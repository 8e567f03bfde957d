"""Comparison reports: policies side by side on one workload, as markdown, JSON and plots.

What ``/work/shared/notes/evaluation-method.md`` asks of every run goes in:
energy and energy per token, SLO attainment with its TTFT and TBT parts and
percentiles, GPU- and node-hours, cold starts, migrations (of instances and of
queued requests), drops, and the energy split by part, with each policy's
difference from the best baseline broken down by part so that a saving
explained by one part alone (idle power of GPUs a baseline keeps powered, for
example) is plain to see. The floor
from ``festina_hpc.sim.bound`` is shown where given. Festina's variants (any
policy whose name starts with ``festina``: festina and its ablations
festina-placement, festina-control) are compared to the best baseline at equal
SLO: the baseline (any other policy) that spent the least energy among those
whose SLO attainment meets the target (0.99 unless told), or none. A cheaper
baseline that misses the target is named, not compared against: energy saved by
missing SLOs is no saving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from festina_hpc.sim.bound import Bound
from festina_hpc.sim.simulator import ENERGY_PARTS, NODE_ENERGY_PARTS, SimResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

J_PER_KWH = 3.6e6
DEFAULT_SLO_TARGET = 0.99  # SLO attainment a baseline must meet to be the one compared against
# Energy parts in report order: SimResult.energy_parts_j key, label.
PARTS = (("gpu_active_j", "GPU active"), ("gpu_idle_j", "GPU idle"), ("node_static_j", "node static"),
         ("standby_j", "standby"), ("cold_start_j", "cold start"), ("migration_j", "migration"),
         ("share_restart_j", "share restart"))
PART_COLORS = ("#d62728", "#ff9896", "#7f7f7f", "#c7c7c7", "#1f77b4", "#9467bd", "#ff7f0e")


def is_baseline(policy: str) -> bool:
    """Every policy but festina and its ablations (festina-placement, festina-control)."""
    return not policy.startswith("festina")


def best_baseline(results: Sequence[SimResult], slo_target: float = DEFAULT_SLO_TARGET) -> SimResult | None:
    """The baseline that spent the least energy of those whose SLO attainment meets ``slo_target``, or None."""
    pool = [r for r in results if is_baseline(r.policy) and r.slo_attainment >= slo_target]
    return min(pool, key=lambda r: r.energy_j, default=None)


def cheaper_below_target(results: Sequence[SimResult], slo_target: float = DEFAULT_SLO_TARGET) -> list[SimResult]:
    """Baselines that spent less than the best baseline (any energy, when there is none) but missed the target."""
    best = best_baseline(results, slo_target)
    return [r for r in results if is_baseline(r.policy) and r.slo_attainment < slo_target
            and (best is None or r.energy_j < best.energy_j)]


def comparison_json(results: Sequence[SimResult], bound: Bound | None,
                    slo_target: float = DEFAULT_SLO_TARGET) -> dict[str, Any]:
    """comparison.json: the best baseline by the SLO rule, festina's ratio to it, and a row per policy
    (its ``as_dict``, every energy part present, with its ratios to the best baseline and the bound)."""
    best = best_baseline(results, slo_target)
    festina = next((r for r in results if r.policy == "festina"), None)
    rows = []
    for r in results:
        row = r.as_dict()
        row["energy_parts_j"] = {key: r.energy_parts_j.get(key, 0.0) for key in ENERGY_PARTS} | {
            key: j for key, j in r.energy_parts_j.items() if key not in ENERGY_PARTS}
        row["meets_slo_target"] = r.slo_attainment >= slo_target
        row["x_best_baseline"] = r.energy_j / best.energy_j if best is not None and best.energy_j > 0 else None
        row["x_bound"] = r.energy_j / bound.energy_j if bound is not None and bound.energy_j > 0 else None
        rows.append(row)
    return {"slo_target": slo_target, "best_baseline": best.policy if best else None,
            "festina_vs_best_baseline": (festina.energy_j / best.energy_j
                                         if festina is not None and best is not None and best.energy_j > 0
                                         else None),
            "cheaper_baselines_below_target": [r.policy for r in cheaper_below_target(results, slo_target)],
            "bound_energy_j": bound.energy_j if bound is not None else None,
            "results": rows}


def comparison_markdown(results: Sequence[SimResult], bound: Bound | None,
                        slo_target: float = DEFAULT_SLO_TARGET) -> str:
    """Markdown: the summary tables, the energy split, and where each policy's difference comes from."""
    best = best_baseline(results, slo_target)
    lines = ["# Policy comparison", ""]
    if results:
        first = results[0]
        if best is not None:
            chosen = (f"Best baseline at equal SLO: **{best.policy}**, the least energy of the baselines whose "
                      f"SLO attainment meets {_pct(slo_target)}.")
        else:
            chosen = (f"Best baseline at equal SLO: **none**: no baseline's SLO attainment meets "
                      f"{_pct(slo_target)}, so no policy is compared against one.")
        cheaper = cheaper_below_target(results, slo_target)
        if cheaper:
            chosen += " Spent less but missed the target (not compared against): " + ", ".join(
                f"{r.policy} ({_pct(r.slo_attainment)} SLO, {_kwh(r.energy_j)} kWh)" for r in cheaper) + "."
        lines.append(f"{first.requests_total} requests; every policy ran on the same workload, profiles and "
                     f"cluster. {chosen}")
        lines.append("")
    lines += _summary_table(results, bound, best, slo_target)
    lines += ["", "SLO attainment: share of all requests (dropped and unfinished ones count as misses) whose "
              "TTFT is within the model's TTFT SLO and whose TBT, the request's mean time between tokens "
              "(first to last token), is within the model's TBT SLO. p50/p99 are over completed requests. "
              "GPU kWh: what the GPUs drew (the total less node static and standby power).", ""]
    lines += ["## Latency and operations", ""]
    lines += _operations_table(results, bound)
    lines += ["", "## Energy split", "", "kWh per part, and its share of the policy's total.", ""]
    lines += _split_table(results, bound)
    if best is not None and len(results) > 1:
        lines += ["", f"## Difference from {best.policy} by part", "",
                  f"kWh above (+) or below (-) {best.policy}, the best baseline at equal SLO; the last column "
                  "names the part that accounts for most of the difference and its share of it.", ""]
        lines += _difference_table(results, best)
    if bound is not None:
        lines += ["", "## Lower bound", "",
                  f"No policy that serves every request can spend less than **{_kwh(bound.energy_j)} kWh** "
                  f"on this workload and meet every TTFT SLO (tokens at the most efficient point of the "
                  f"profiles, plus the nodes that must be powered while requests are in flight, while models "
                  f"must stay loaded to meet TTFT SLOs shorter than a load, and for the resume time before a "
                  f"node must be on; loads counted as 0). By term:", ""]
        lines += _table(["term", "kWh", "share"], [[name.replace("_", " "), _kwh(j), _share(j, bound.energy_j)]
                                                   for name, j in bound.terms_j.items()])
        lines += ["", "A run that misses some TTFT SLOs is bounded by the floor of the requests that met them. "
                  "How each term is computed and proven: `method` and `terms` in bound.json."]
    return "\n".join(lines) + "\n"


def _summary_table(results: Sequence[SimResult], bound: Bound | None, best: SimResult | None,
                   slo_target: float) -> list[str]:
    header = ["policy", "energy kWh", "GPU kWh", "J/token", f"x {best.policy if best else 'best baseline'}",
              "x bound", "SLO att.", f"meets {_pct(slo_target)}", "TTFT att.", "TBT att."]
    rows = []
    for r in results:
        rows.append([r.policy, _kwh(r.energy_j), _kwh(r.gpu_energy_j), _num(r.energy_per_token_j, 3),
                     _ratio(r.energy_j, best.energy_j if best else math.nan),
                     _ratio(r.energy_j, bound.energy_j if bound else math.nan),
                     _pct(r.slo_attainment), "yes" if r.slo_attainment >= slo_target else "no",
                     _pct(r.ttft_attainment), _pct(r.tbt_attainment)])
    if bound is not None:
        per_token = bound.energy_j / bound.generated_tokens if bound.generated_tokens else math.nan
        gpu_j = sum(j for key, j in bound.energy_parts_j.items() if key not in NODE_ENERGY_PARTS)
        rows.append(["*lower bound*", _kwh(bound.energy_j), _kwh(gpu_j), _num(per_token, 3),
                     _ratio(bound.energy_j, best.energy_j if best else math.nan), "1.00", "-", "-", "-", "-"])
    return _table(header, rows)


def _operations_table(results: Sequence[SimResult], bound: Bound | None) -> list[str]:
    header = ["policy", "TTFT p50 s", "TTFT p99 s", "TBT p50 ms", "TBT p99 ms", "GPU-h", "node-h", "cold starts",
              "migrations", "requests moved", "share restarts", "clock changes", "dropped"]
    rows = []
    for r in results:
        rows.append([r.policy, _num(r.ttft_p50_s, 3), _num(r.ttft_p99_s, 3), _num(r.tbt_p50_s * 1e3, 1),
                     _num(r.tbt_p99_s * 1e3, 1), _num(r.gpu_hours_powered, 2), _num(r.node_hours_powered, 2),
                     str(r.cold_starts), str(r.migrations), str(r.request_migrations), str(r.share_restarts),
                     str(r.clock_changes), str(r.requests_dropped)])
    if bound is not None:
        rows.append(["*lower bound*", "-", "-", "-", "-", _num(bound.gpu_hours_powered, 2),
                     _num(bound.node_hours_powered, 2), "-", "-", "-", "-", "-", "-"])
    return _table(header, rows)


def _split_table(results: Sequence[SimResult], bound: Bound | None) -> list[str]:
    header = ["policy", *(label for _, label in PARTS), "total"]
    entries: list[tuple[str, dict[str, float], float]] = [(r.policy, r.energy_parts_j, r.energy_j) for r in results]
    if bound is not None:
        entries.append(("*lower bound*", bound.energy_parts_j, bound.energy_j))
    rows = []
    for name, parts, total in entries:
        cells = [f"{_kwh(parts.get(key, 0.0))} ({_share(parts.get(key, 0.0), total)})" for key, _ in PARTS]
        rows.append([name, *cells, _kwh(total)])
    return _table(header, rows)


def _difference_table(results: Sequence[SimResult], best: SimResult) -> list[str]:
    header = ["policy", *(label for _, label in PARTS), "total", "mostly from"]
    rows = []
    for r in results:
        if r is best:
            continue
        deltas = {key: r.energy_parts_j.get(key, 0.0) - best.energy_parts_j.get(key, 0.0) for key, _ in PARTS}
        total = r.energy_j - best.energy_j
        rows.append([r.policy, *(_signed_kwh(deltas[key]) for key, _ in PARTS), _signed_kwh(total),
                     _main_part(deltas, total)])
    return _table(header, rows)


def _main_part(deltas: dict[str, float], total: float) -> str:
    """The part with the largest difference in the direction of the total, and its share of the total."""
    if total == 0.0 or not math.isfinite(total):
        return "-"
    key = max(deltas, key=lambda k: deltas[k] * math.copysign(1.0, total))
    label = dict(PARTS)[key]
    return f"{label} ({deltas[key] / total:.0%})"


def write_plots(results: Sequence[SimResult], out_dir: Path, bound: Bound | None = None,
                slo_target: float = DEFAULT_SLO_TARGET) -> list[Path]:
    """energy.png (stacked by part), power.png (cluster power over time), slo.png; returns their paths.

    Figures are drawn on their own Agg canvases, so pyplot's global state is never touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [r.policy for r in results]
    paths = []

    # Energy per policy, stacked by part, with the floor as a line.
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 3.0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bottom = [0.0] * len(results)
    for (key, label), color in zip(PARTS, PART_COLORS):
        heights = [r.energy_parts_j.get(key, 0.0) / J_PER_KWH for r in results]
        ax.bar(names, heights, bottom=bottom, label=label, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.3g}", (i, total), xytext=(0, 3), textcoords="offset points", ha="center",
                    fontsize="small")
    ax.set_ylim(0.0, 1.12 * max([*bottom, bound.energy_j / J_PER_KWH if bound else 0.0, 1e-9]))
    if bound is not None:
        ax.axhline(bound.energy_j / J_PER_KWH, color="black", linestyle="--", linewidth=1.2,
                   label=f"lower bound ({bound.energy_j / J_PER_KWH:.3g} kWh)")
    ax.set_title("Energy per policy, by part")
    ax.set_xlabel("policy")
    ax.set_ylabel("energy (kWh)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.tick_params(axis="x", labelrotation=20)
    paths.append(_save(fig, out_dir / "energy.png"))

    # Cluster power over time.
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    longest_s = max((t for r in results for t, _ in r.power_timeline), default=0.0)
    minutes = longest_s <= 3 * 3600
    scale, unit = (60.0, "min") if minutes else (3600.0, "h")
    for r in results:
        if r.power_timeline:
            times, powers = zip(*r.power_timeline)
            ax.plot([t / scale for t in times], [p / 1e3 for p in powers], label=r.policy, linewidth=1.2)
    ax.set_title("Cluster power over time (10 s averages)")
    ax.set_xlabel(f"simulated time ({unit})")
    ax.set_ylabel("power (kW)")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    if any(r.power_timeline for r in results):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    paths.append(_save(fig, out_dir / "power.png"))

    # SLO attainment, with its TTFT and TBT parts.
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 3.0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.27
    values = [100.0 * getattr(r, a) for r in results for a in ("slo_attainment", "ttft_attainment", "tbt_attainment")]
    # Attainments near 100% differ by a few points: start the axis just below the lowest, when that is high.
    low = min(values, default=0.0)
    bottom_pct = 0.0 if low < 50.0 else 5.0 * math.floor((low - 2.0) / 5.0)
    series = (("SLO (both)", "slo_attainment", "#2ca02c"), ("TTFT", "ttft_attainment", "#98df8a"),
              ("TBT", "tbt_attainment", "#17becf"))
    for k, (label, attr, color) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(results))]
        bars = ax.bar(xs, [100.0 * getattr(r, attr) for r in results], width=width, label=label, color=color)
        if attr == "slo_attainment":
            ax.bar_label(bars, fmt="%.1f", fontsize="small")
    ax.axhline(100.0 * slo_target, color="black", linestyle=":", linewidth=1.0, label=f"target {_pct(slo_target)}")
    ax.set_xticks(range(len(results)), names, rotation=20)
    ax.set_ylim(bottom_pct, 100.0 + 0.1 * (100.0 - bottom_pct))
    ax.set_title("SLO attainment per policy" + (f" (axis from {bottom_pct:.0f}%)" if bottom_pct else ""))
    ax.set_xlabel("policy")
    ax.set_ylabel("requests within SLO (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    paths.append(_save(fig, out_dir / "slo.png"))
    return paths


def write_comparison(results: Sequence[SimResult], bound: Bound | None, out_dir: Path,
                     slo_target: float = DEFAULT_SLO_TARGET) -> list[Path]:
    """comparison.json (``comparison_json``), comparison.md, bound.json (when given) and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "comparison.json", out_dir / "comparison.md"]
    written[0].write_text(json.dumps(comparison_json(results, bound, slo_target), indent=2) + "\n",
                          encoding="utf-8")
    written[1].write_text(comparison_markdown(results, bound, slo_target), encoding="utf-8")
    if bound is not None:
        path = out_dir / "bound.json"
        path.write_text(json.dumps(bound.as_dict(), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written + write_plots(results, out_dir, bound, slo_target)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


# -- formatting -------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def _kwh(energy_j: float) -> str:
    return _num(energy_j / J_PER_KWH, 3)


def _signed_kwh(energy_j: float) -> str:
    return f"{round(energy_j / J_PER_KWH, 3) + 0.0:+.3f}" if math.isfinite(energy_j) else "-"  # + 0.0: no "-0.000"


def _num(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _pct(value: float) -> str:
    return f"{100.0 * value:.1f}%" if math.isfinite(value) else "-"


def _share(part: float, total: float) -> str:
    return f"{part / total:.0%}" if total > 0 else "-"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 and math.isfinite(reference) else "-"
