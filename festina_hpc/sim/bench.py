"""The simulator speed benchmark behind ``festina bench sim``.

Two figures: how much faster than real time the simulator replays the 1-hour
Azure conv trace on one 8-GPU node, and the wall time per simulated request
as the cluster grows from 1 to 64 nodes. At N nodes the workload is N
superposed copies of the trace's first ``scaling_duration_s`` (independent
model draws), so every size carries the same load per GPU; the cost per
request must stay flat (no decision may scan the whole cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from festina_hpc.config import Config
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.experiment import ExperimentOptions, build_experiment


def run_sim_bench(config: Config, store: ProfileStore, policy: str, node_counts: Sequence[int],
                  models: int, scaling_duration_s: float = 600.0) -> dict[str, Any]:
    headline = build_experiment(config, store, ExperimentOptions(trace="azure-conv", models=models, nodes=1,
                                                                 gpus_per_node=8))
    result = headline.run(store, policy)
    scaling = []
    for nodes in node_counts:
        experiment = build_experiment(config, store, ExperimentOptions(
            trace="azure-conv", models=models, nodes=nodes, gpus_per_node=8, copies=nodes,
            duration_s=scaling_duration_s))
        scaled = experiment.run(store, policy)
        scaling.append({"nodes": nodes, "gpus": nodes * 8, "requests": scaled.requests_total,
                        "wall_s": scaled.sim_wall_s, "us_per_request": 1e6 * scaled.sim_wall_s / scaled.requests_total,
                        "events": scaled.events, "slo_attainment": scaled.slo_attainment})
    per_request = [row["us_per_request"] for row in scaling]
    return {
        "policy": policy,
        "trace": "azure-conv",
        "models": models,
        "requests": result.requests_total,
        "sim_time_s": result.sim_time_s,
        "sim_wall_s": result.sim_wall_s,
        "realtime_factor": result.sim_time_s / result.sim_wall_s,
        "scaling_duration_s": scaling_duration_s,
        "scaling": scaling,
        "us_per_request_max_over_min": max(per_request) / min(per_request),
    }
