"""PNG plots of the rollups: energy per hour by model, mean GPU power per hour by node (matplotlib, Agg).

Drawn on a bare ``matplotlib.figure.Figure``, which renders through the Agg canvas without pyplot:
no display is needed (head nodes have none) and no global backend state is touched.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from pathlib import Path

from matplotlib.figure import Figure

from festina_hpc.db.accounting import QueryResult
from festina_hpc.errors import FestinaError

# What each --what plots: (query, series column, y column, y label, scale applied to y)
PLOTS = {
    "model": ("energy_by_model_hour", "model", "energy_j", "GPU energy per hour (kWh)", 1 / 3.6e6),
    "node": ("power_per_node_hour", "node", "mean_power_w", "mean GPU power over the hour (W)", 1.0),
}


def plot(result: QueryResult, what: str, out: Path, title: str) -> int:
    """Draw one line per model or node over the hours of ``result`` into ``out``; returns how many lines."""
    _query, series_column, y_column, y_label, scale = PLOTS[what]
    if not result.rows:
        raise FestinaError(f"--what {what}: no energy recorded in {title}: nothing to plot")
    series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    columns = result.columns
    for row in result.rows:
        values = dict(zip(columns, row))
        series[str(values[series_column])].append((values["hour_at"], float(values[y_column]) * scale))
    figure = Figure(figsize=(10, 5))
    axes = figure.subplots()
    for name in sorted(series):
        points = sorted(series[name])
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)  # type: ignore[arg-type]
    axes.set_xlabel("hour (UTC)")
    axes.set_ylabel(y_label)
    axes.set_title(f"festina: {y_label.split(' (')[0]} by {what}, {title}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.autofmt_xdate()
    try:
        figure.savefig(out, dpi=100)
    except (OSError, ValueError) as exc:
        raise FestinaError(f"--out = {str(out)!r}: cannot write the plot: {exc}") from None
    return len(series)


__all__ = ["PLOTS", "plot"]
