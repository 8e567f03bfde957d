"""One simulation experiment: a workload, SLOs and a cluster resolved from the config and options.

Every policy in a comparison runs on the same ``Experiment`` (same requests,
seed, SLOs, cluster figures and profiles), and its resolved settings are
written next to every result (``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.cluster.slo import default_slo
from festina_hpc.config import POWER_SAVING_MODES, Config
from festina_hpc.errors import ConfigError, TraceError
from festina_hpc.policy.base import PolicyContext, make_policy
from festina_hpc.policy.types import Request, Slo
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.simulator import SimResult, Simulation
from festina_hpc.sim.workload import (
    DEFAULT_MODEL_MIX,
    build_requests,
    load_trace,
    model_mix_path,
    parse_popularity,
    read_model_mix,
    shipped_trace,
    split_model_mix,
)


@dataclass(frozen=True)
class ExperimentOptions:
    """What a user chooses per run; ``None`` takes the config's value."""

    trace: str  # a CSV path, or a shipped trace name (azure-code, azure-conv)
    models: int | None = None
    model_mix: Path | str | None = None  # a file, or the name of a shipped mix
    popularity: str | None = None
    seed: int | None = None
    rate_scale: float | None = None
    duration_s: float | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    gpu: str | None = None
    copies: int = 1  # superpose this many copies of the trace (independent model draws): copies x the load
    power_saving: str | None = None  # "slurm" | "none": overrides [cluster] power_saving


@dataclass(frozen=True)
class Experiment:
    requests: list[Request]
    slos: dict[str, Slo]
    cluster: ClusterConfig
    keep_alive_s: float
    live_share_change: bool = False  # [gpu]: whether a running instance's SM share can change in place
    resolved: dict[str, Any] = field(default_factory=dict)

    def run(self, store: ProfileStore, policy_name: str) -> SimResult:
        cluster = self.cluster
        context = PolicyContext(store, cluster.gpu_type, keep_alive_s=self.keep_alive_s,
                                node_static_w=cluster.node_static_w_per_gpu * cluster.gpus_per_node,
                                resume_time_s=cluster.resume_time_s,
                                load_init_s=cluster.load_init_s, load_gbs=cluster.load_gbs,
                                live_share_change=self.live_share_change,
                                known_rates_per_s=known_rates_per_s(self.requests),
                                known_lengths=known_lengths(self.requests))
        policy = make_policy(policy_name, context)
        return Simulation(self.cluster, store, policy, self.requests, self.slos,
                          live_share_change=self.live_share_change).run()

    def write_config(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "config.json"
        path.write_text(json.dumps(self.resolved, indent=2) + "\n", encoding="utf-8")
        return path


def known_rates_per_s(requests: list[Request]) -> dict[str, float]:
    """Each model's mean arrival rate over the workload's span (first to last arrival): the rates
    a policy that places offline (MuxServe) is given in advance."""
    if not requests:
        return {}
    span_s = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.model] = counts.get(r.model, 0) + 1
    return {m: n / span_s if span_s > 0 else 0.0 for m, n in sorted(counts.items())}


def known_lengths(requests: list[Request]) -> dict[str, tuple[float, float]]:
    """Each model's mean (prompt, output) tokens over the workload."""
    sums: dict[str, list[float]] = {}
    for r in requests:
        entry = sums.setdefault(r.model, [0.0, 0.0, 0.0])
        entry[0] += r.prompt_tokens
        entry[1] += r.output_tokens
        entry[2] += 1
    return {m: (p / n, o / n) for m, (p, o, n) in sorted(sums.items())}


def trace_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    return path if path.suffix or path.exists() else shipped_trace(name_or_path)


def build_experiment(config: Config, store: ProfileStore, options: ExperimentOptions) -> Experiment:
    sim = config.sim
    seed = sim.seed if options.seed is None else options.seed
    rate_scale = sim.rate_scale if options.rate_scale is None else options.rate_scale
    duration_s = sim.duration_s if options.duration_s is None else options.duration_s
    popularity = parse_popularity(options.popularity or sim.popularity)
    power_saving = options.power_saving or config.cluster.power_saving
    if power_saving not in POWER_SAVING_MODES:
        raise ConfigError(f"power_saving = {power_saving!r} must be one of {', '.join(POWER_SAVING_MODES)}")
    cluster = dataclasses.replace(
        config.cluster,
        nodes=options.nodes or config.cluster.nodes,
        gpus_per_node=options.gpus_per_node or config.cluster.gpus_per_node,
        gpu_type=store.gpu(options.gpu or config.cluster.gpu_type).name,
        power_saving=power_saving)
    if options.model_mix is not None:
        mix = read_model_mix(model_mix_path(options.model_mix))
        for entry in mix:
            if entry.profile is not None:
                store.catalog.add_variant(entry.name, entry.profile)
        names, weights = split_model_mix(mix)
        models = [store.model(m).name for m in names]
    else:
        count = options.models or sim.models
        if not 1 <= count <= len(DEFAULT_MODEL_MIX):
            raise TraceError(f"models = {count} must be between 1 and {len(DEFAULT_MODEL_MIX)} "
                             f"(the default mix); use --model-mix for others")
        models, weights = list(DEFAULT_MODEL_MIX[:count]), None
    path = trace_path(options.trace)
    trace = load_trace(path)
    if options.copies < 1:
        raise TraceError(f"copies = {options.copies} must be at least 1")
    requests = []
    for copy in range(options.copies):
        rng = np.random.default_rng(seed if copy == 0 else [seed, copy])
        requests += build_requests(trace, models, popularity, rng, rate_scale=rate_scale,
                                   duration_s=duration_s or None, weights=weights)
    if options.copies > 1:
        requests.sort(key=lambda r: r.arrival_s)
    requests = [dataclasses.replace(r, id=i, arrival_s=r.arrival_s + sim.warmup_s) for i, r in enumerate(requests)]
    overrides = {store.model(name).name: override for name, override in config.slo.items()}
    slos = {}
    for model in sorted({r.model for r in requests} | set(models)):
        override = overrides.get(model)
        if override is not None:
            slos[model] = Slo(override.ttft_s, override.tbt_s)
        else:
            slos[model] = default_slo(store, cluster.gpu_type, model, sim.ttft_slo_multiplier,
                                      sim.tbt_slo_multiplier)
    resolved = {
        "trace": str(path), "requests": len(requests), "models": models, "weights": weights,
        "popularity": str(popularity), "seed": seed, "rate_scale": rate_scale, "duration_s": duration_s or None,
        "copies": options.copies, "warmup_s": sim.warmup_s,
        "cluster": dataclasses.asdict(cluster), "keep_alive_s": sim.keep_alive_s,
        "slos": {m: dataclasses.asdict(s) for m, s in slos.items()}, "profiles_dir": str(store.dir),
        "live_share_change": config.gpu.live_share_change, "config_file": config.source,
    }
    return Experiment(requests, slos, cluster, sim.keep_alive_s, config.gpu.live_share_change, resolved)
