"""The energy floor: a lower bound on what any policy's run of a workload costs in the simulator.

``energy_lower_bound`` answers "how much energy must every run of these
requests spend, under these profiles and cluster figures, whatever the policy
decides?". It bounds each charge the simulator makes from below, from the
workload and the tables alone, so every run that serves every request is at
or above it and the distance to it is what is left to win (see
``/work/shared/notes/evaluation-method.md``, "The floor"). The terms, the
argument for each, and the conditions under which it holds are in ``METHOD``,
which travels with every ``Bound`` into ``bound.json``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from festina_hpc.cluster.figures import ClusterConfig, ColdStartModel
from festina_hpc.policy.types import Request, Slo
from festina_hpc.profiles.specs import GpuSpec, ModelSpec
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import PHASES, ProfileTable

FloatArray = npt.NDArray[np.float64]

# Sub-boxes per table cell and axis when bounding the interpolated per-token energy: the floor of
# each sub-box is within ~1% of the true minimum at 4 (it converges as the square of this).
REFINE = 4

METHOD = f"""\
Lower bound on the energy the simulator charges any policy that serves every request of the
workload. A run that drops requests can go below it (its drops count as SLO misses instead),
but not below the floor of the requests it served.
Terms 1 to 3 hold for runs that meet SLOs or not; terms 4 and 5 for the requests that meet their
TTFT SLO. It is the sum of these floors on separate charges:

1. Tokens (gpu_active_j). Each request's prompt tokens (capped at the table's top context, the
   most one prefill step is charged for) times the model's least prefill energy per prompt
   token, plus its output_tokens - 1 decode tokens times the least decode energy per token,
   (power - idle) x latency x tp / tokens. "Least" is over every point a run can reach: any
   batch, context, SM share and clock inside the table, between grid points too. Tables
   interpolate multilinearly and the per-token energy can dip below every grid point inside a
   cell, so each cell is cut into {REFINE}^4 sub-boxes (corners: exact interpolated values) and
   each sub-box's floor is a McCormick under-estimate of power x latency divided by its tokens,
   taken at the sub-box corners (where such a multilinear-over-linear function is least). Left
   out are points no run reaches: two or more sequences whose KV cache (batch x context) and
   weights overflow a GPU's usable memory, two or more prompts over step_token_budget.
   Instances sharing a GPU (MPS) are charged at most TDP - idle together, so the floor is also
   capped at (TDP - idle) x tp x m x latency / tokens, m the least memory fraction per GPU the
   step needs (weights, plus KV cache for two or more sequences): co-resident fractions sum to
   at most 1. SM shares would not bound it: a share below the table's lowest runs as the
   lowest, so co-resident instances can together run with more than 100%.
2. Powered nodes (gpu_idle_j, node_static_j). From arrival to completion every served request
   is held by an instance on a powered (on or waking) node, and it cannot complete before its
   arrival plus the model's least prefill latency plus output_tokens - 1 least decode steps.
   While such intervals are open, their models' weights are in GPU memory: at least
   max(tp, ceil(sum of weights / usable memory per GPU)) GPUs, so that many whole nodes, each
   drawing its static power and the idle power of all its GPUs. Off nodes draw standby_w up to
   the last arrival or earliest possible completion.
3. Loads and migrations (cold_start_j, migration_j): 0. A policy may start every instance
   before its first request and never move one, and a load's power can hide under the TDP cap
   of a co-resident instance.

Two more floors hold for the requests that meet their TTFT SLO (all of them unless the caller
names those that did, ``ttft_met``; the floor of a run that misses some is the floor with only
the others named, every term growing with the requests named). They lengthen term 2's intervals
and add powered nodes; they use that an instance starts only by loading its weights, that a load
begins only on a node that is on, that a node holding an instance cannot be powered off, and that
a node off at any time is on again only resume_time_s (R) after it was resumed.

4. Loaded models. Let L be the model's least load time: the least over the simulator's loaders
   (standard, fast, host cache) of their start time plus the weights per GPU over their
   bandwidth. A request that meets its TTFT SLO T gets its first token at some f in
   [a + p, a + T] (a: arrival, p: least prefill latency) from an instance I that it stays on to
   the end (running requests never move). I was ready at f - p or before, so it began loading at
   f - L - p or before, and its node has been on, and I has held its weights, from then to the
   request's completion, at f + (n - 1) x d or later (n output tokens, d the least decode step).
   As f ranges over [a + p, a + T], the span every case shares is [a + T - L - p, a + s],
   s = p + (n - 1) x d: I's weights are in memory on a node that is on throughout it. So term
   2's interval of such a request starts L + p - T earlier (when positive): a model asked for
   again sooner than that after its last request cannot have been unloaded and reloaded in
   between, and the models whose (lengthened) intervals overlap share GPU memory,
   max(tp, ceil(sum of their weights / usable memory per GPU)) GPUs, as in term 2. Counted as
   the powered node-seconds this adds over term 2, at on power less standby.
5. Wake time. A node that is on at t' has been powered throughout [t' - R, t'] (or since the
   start, when nodes are all on): after its last resume it waited R, and it was not powered off
   in between or it would have needed a later resume. By term 4, at t' the models of the requests
   whose span [a + T - L - p, a + s] holds t' are in memory on nodes that are on: at least k(t')
   nodes, k counted from their weights as in term 2. So at any t at least max k(t') over
   t' in [t, t + R] nodes are powered: each level set {{k >= j}} widened by R to the left, which
   holds for several nodes because the j nodes on at t' are each powered over [t' - R, t'].
   A request whose span is empty (T > L + p + s) still has its node on at f, so one node is powered
   over [a + T - R, a + p]. Counted as the powered node-seconds this adds over terms 2 and 4.

Only the total is a bound; the parts say where it comes from (the simulator books the idle
power of a GPU that only loads as cold start, for example). Conditions: every step stays
inside the table's batch axis (batch caps at most its top batch, 512 in the shipped tables;
beyond it the simulator charges the time of the top batch for a bigger one), and table power
lies between idle and TDP (true of the shipped tables; elsewhere a cruder floor is used)."""


# What each entry of ``Bound.terms_j`` counts (bound.json's "terms"); they add up to energy_j.
TERMS = {
    "tokens": "term 1: prompt and decode tokens at the least energy per token (gpu_active_j)",
    "standby": "every node's standby power over the horizon (standby_j, and the standby a powered node draws "
               "in place of it)",
    "in_flight": "term 2: nodes powered while requests must be in flight, at on power less standby",
    "loaded_models": "term 4: nodes powered while a model must stay loaded for a request that meets its TTFT SLO, "
                     "beyond term 2",
    "wake_time": "term 5: nodes powered for the resume time before they must be on, beyond terms 2 and 4",
}


@dataclass(frozen=True)
class Bound:
    """A floor on energy for one workload; ``as_dict`` is ``bound.json``."""

    energy_j: float
    energy_parts_j: dict[str, float]  # same keys as SimResult.energy_parts_j
    requests_total: int
    generated_tokens: int  # output tokens of all requests (as SimResult counts them when all complete)
    horizon_s: float  # no run of the workload ends before this
    in_flight_s: float  # time during which some request must be in flight
    node_hours_powered: float  # least node-hours that must be powered
    gpu_hours_powered: float  # the GPUs of those nodes
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)
    terms_j: dict[str, float] = field(default_factory=dict)  # TERMS' keys; they add up to energy_j
    ttft_met: int = 0  # requests taken to meet their TTFT SLO (terms 4 and 5 count only these)
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        return {"policy": "bound", "energy_j": self.energy_j, "energy_parts_j": dict(self.energy_parts_j),
                "terms": {name: {"energy_j": j, "counts": TERMS[name]} for name, j in self.terms_j.items()},
                "requests_total": self.requests_total, "ttft_met": self.ttft_met,
                "generated_tokens": self.generated_tokens, "horizon_s": self.horizon_s,
                "in_flight_s": self.in_flight_s, "node_hours_powered": self.node_hours_powered,
                "gpu_hours_powered": self.gpu_hours_powered,
                "per_model": {m: dict(v) for m, v in self.per_model.items()}, "method": self.method}


Span = tuple[float, float, str]  # (start_s, end_s, model)


def energy_lower_bound(requests: Sequence[Request], store: ProfileStore, config: ClusterConfig,
                       slos: Mapping[str, Slo], ttft_met: Collection[int] | None = None) -> Bound:
    """The energy floor of serving ``requests`` on ``config`` under ``store``'s profiles (see ``METHOD``).

    ``ttft_met``: ids of the requests known to meet their TTFT SLO (``slos``), the only ones terms 4
    and 5 count; None takes every request to meet it (the floor of runs that meet every TTFT SLO).
    ``slos``' models are listed in ``per_model`` even without traffic.
    """
    spec = store.gpu(config.gpu_type)
    usable_bytes = spec.memory_bytes * config.usable_memory_frac
    names = sorted({store.model(r.model).name for r in requests} | {store.model(m).name for m in slos})
    models = {name: store.model(name) for name in names}
    tables = {name: store.table(spec.name, name) for name in names}
    slo_of = {store.model(m).name: slo for m, slo in slos.items()}

    per_model: dict[str, dict[str, float]] = {}
    by_model: dict[str, list[Request]] = {name: [] for name in names}
    for r in requests:
        by_model[store.model(r.model).name].append(r)
    active_j = 0.0
    resume_s = config.resume_time_s
    held: list[Span] = []  # term 2: arrival to least completion
    loaded: list[Span] = []  # term 4: held, started L + p - T earlier for a request that meets its TTFT
    on: list[Span] = []  # term 4: when the request's instance's node must be on
    one_node: list[tuple[float, float]] = []  # term 5, a request whose on-span is empty
    met = 0
    for name in names:
        table, model = tables[name], models[name]
        mine = by_model[name]
        top_context = table.bounds("context_tokens")[1]
        prefill_tokens = sum(min(float(r.prompt_tokens), top_context) for r in mine)
        decode_tokens = sum(max(0, r.output_tokens - 1) for r in mine)
        prefill_floor = token_energy_floor_j(table, "prefill", spec, model, config)
        decode_floor = token_energy_floor_j(table, "decode", spec, model, config)
        prefill_j, decode_j = prefill_tokens * prefill_floor, decode_tokens * decode_floor
        active_j += prefill_j + decode_j
        # Least latencies: a multilinear interpolation never goes below its smallest corner.
        prefill_s = float(table.latency_s[PHASES.index("prefill")].min())
        step_s = float(table.latency_s[PHASES.index("decode")].min())
        load_s = least_load_s(model, model.tp_on(spec.name), config)
        slo = slo_of.get(name)
        for r in mine:
            end_s = r.arrival_s + prefill_s + max(0, r.output_tokens - 1) * step_s
            held.append((r.arrival_s, end_s, name))
            if slo is None or (ttft_met is not None and r.id not in ttft_met):
                loaded.append((r.arrival_s, end_s, name))
                continue
            met += 1
            ttft_s = slo.ttft_for(r.prompt_tokens)
            on_s = r.arrival_s + ttft_s - load_s - prefill_s
            loaded.append((min(r.arrival_s, on_s), end_s, name))
            if on_s <= end_s:
                on.append((on_s, end_s, name))
            else:
                one_node.append((r.arrival_s + ttft_s - resume_s, r.arrival_s + prefill_s))
        per_model[name] = {"requests": len(mine), "tp": table.tp, "prefill_tokens": prefill_tokens,
                           "decode_tokens": decode_tokens, "prefill_j_per_token": prefill_floor,
                           "decode_j_per_token": decode_floor, "prefill_j": prefill_j, "decode_j": decode_j,
                           "least_load_s": load_s, "least_prefill_s": prefill_s}

    def gpus_needed(open_models: Collection[str]) -> int:
        weights = sum(models[m].weights_bytes for m in open_models)
        return max(max(tables[m].tp for m in open_models), math.ceil(weights / usable_bytes))

    gpn = config.gpus_per_node
    held_levels = _node_levels(held, gpus_needed, gpn, config.nodes)
    loaded_levels = _node_levels(loaded, gpus_needed, gpn, config.nodes)
    on_levels = _node_levels(on, gpus_needed, gpn, config.nodes)
    in_flight_s = _measure(_union([(s, e) for s, e, _ in held]))
    held_s = sum(_measure(level) for level in held_levels)
    loaded_s = sum(_measure(level) for level in loaded_levels)
    node_s = 0.0
    for j in range(config.nodes):
        spans = list(loaded_levels[j]) if j < len(loaded_levels) else []
        if j < len(on_levels):
            spans += [(s - resume_s, e) for s, e in on_levels[j]]
        if j == 0:
            spans += one_node
        # Every node is on at the start: none was resumed before it.
        node_s += _measure(_union([(max(0.0, s), e) for s, e in spans if e > max(0.0, s)]))
    horizon_s = max([r.arrival_s for r in requests] + [end for _, end, _ in held], default=0.0)
    on_w = gpn * (spec.idle_w + config.node_static_w_per_gpu)
    off_w = config.standby_w
    if off_w <= on_w:
        idle_j = gpn * spec.idle_w * node_s
        static_j = gpn * config.node_static_w_per_gpu * node_s
        standby_j = off_w * (config.nodes * horizon_s - node_s)
        extra_w = on_w - off_w
        terms = {"tokens": active_j, "standby": off_w * config.nodes * horizon_s, "in_flight": extra_w * held_s,
                 "loaded_models": extra_w * (loaded_s - held_s), "wake_time": extra_w * (node_s - loaded_s)}
    else:  # a node that draws more off than on: every node-second costs at least the on power
        idle_j = gpn * spec.idle_w * config.nodes * horizon_s
        static_j = gpn * config.node_static_w_per_gpu * config.nodes * horizon_s
        standby_j = 0.0
        terms = {"tokens": active_j, "standby": idle_j + static_j, "in_flight": 0.0, "loaded_models": 0.0,
                 "wake_time": 0.0}
    parts = {"gpu_active_j": active_j, "gpu_idle_j": idle_j, "cold_start_j": 0.0, "migration_j": 0.0,
             "share_restart_j": 0.0, "node_static_j": static_j, "standby_j": standby_j}
    return Bound(energy_j=sum(parts.values()), energy_parts_j=parts, requests_total=len(requests),
                 generated_tokens=sum(r.output_tokens for r in requests),
                 horizon_s=horizon_s, in_flight_s=in_flight_s, node_hours_powered=node_s / 3600,
                 gpu_hours_powered=node_s * gpn / 3600, per_model=per_model, terms_j=terms, ttft_met=met)


def least_load_s(model: ModelSpec, tp: int, config: ClusterConfig) -> float:
    """The fastest start of an instance of ``model`` on ``tp`` GPUs: the least over the simulator's loaders."""
    loaders = (ColdStartModel("standard", config.load_init_s, config.load_gbs),
               ColdStartModel("fast", config.fast_load_init_s, config.fast_load_gbs),
               ColdStartModel("host cache", config.fast_load_init_s, config.host_cache_gbs))
    return min(loader.load_s(model.weights_bytes / tp) for loader in loaders)


def _node_levels(spans: Sequence[Span], gpus_needed: Callable[[Collection[str]], int], gpus_per_node: int,
                 nodes: int) -> list[list[tuple[float, float]]]:
    """Level sets of the nodes the open spans' models need: entry j lists, in order, the disjoint
    intervals during which at least j + 1 nodes are needed (a sweep over the spans)."""
    events = sorted([(start, 1, m) for start, _, m in spans] + [(end, -1, m) for _, end, m in spans],
                    key=lambda e: (e[0], e[1]))
    open_count: dict[str, int] = {}
    levels: list[list[tuple[float, float]]] = [[] for _ in range(nodes)]
    last_s = 0.0
    for time_s, delta, model in events:
        if open_count and time_s > last_s:
            need = min(nodes, math.ceil(gpus_needed(open_count) / gpus_per_node))
            for j in range(need):
                level = levels[j]
                if level and level[-1][1] == last_s:
                    level[-1] = (level[-1][0], time_s)
                else:
                    level.append((last_s, time_s))
        last_s = time_s
        count = open_count.get(model, 0) + delta
        if count:
            open_count[model] = count
        else:
            del open_count[model]
    return levels


def _union(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _measure(intervals: Sequence[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def token_energy_floor_j(table: ProfileTable, phase: str, spec: GpuSpec, model: ModelSpec,
                         config: ClusterConfig, refine: int = REFINE) -> float:
    """Least dynamic energy per token of an instance (decode: generated; prefill: prompt) over every reachable point.

    Sound between grid points (see ``METHOD``, term 1): for any batch, context, SM share and
    clock inside the table, ``(power - idle) * latency * tp / tokens`` at the interpolated point is
    at least this, and so is the share of a GPU's capped power that co-resident instances get.
    """
    axes = [_refine_axis(axis, refine) for axis in table.axes]
    p = PHASES.index(phase)
    power_w = _interpolate(table.power_w[p], table.axes, axes)
    latency_s = _interpolate(table.latency_s[p], table.axes, axes)
    cap_w = spec.tdp_w - spec.idle_w
    raw_w = power_w - spec.idle_w
    dynamic_w = np.clip(raw_w, 0.0, cap_w)
    batch, context, _, _ = np.meshgrid(*axes, indexing="ij")
    tokens = batch * context if phase == "prefill" else batch

    # One value per sub-box (a cell of the refined grid) from here on. Latency is multilinear and
    # tokens linear in batch (prefill: bilinear in batch x context), so latency / tokens is least at
    # a corner of the box (one axis at a time, it is linear-fractional).
    d_lo = _over_corners(dynamic_w, np.minimum)
    time_per_token = _over_corners(latency_s / tokens, np.minimum)
    crude = d_lo * time_per_token
    reachable, memory_frac = _reachable(table, phase, model, spec, config, batch, context)
    # Where the table's power leaves [idle, TDP] the clip breaks multilinearity: the crude floor there.
    outside = (_over_corners(raw_w, np.minimum) < 0.0) | (_over_corners(raw_w, np.maximum) > cap_w)
    # A value reached at a corner bounds the floor from above, so only the sub-boxes whose crude floor
    # is below the least reachable corner value need the tighter (McCormick) floor.
    reached = float(np.min(np.where(reachable, _over_corners(dynamic_w * latency_s / tokens, np.minimum), np.inf)))
    alone = min(reached, float(np.min(np.where(reachable & outside, crude, np.inf))),
                _mccormick_floor(dynamic_w, latency_s, tokens, reachable & ~outside & (crude < reached)))
    # Co-resident instances split the capped power; their memory fractions sum to at most 1.
    shared = float(np.min(np.where(reachable, cap_w * memory_frac * time_per_token, np.inf)))
    return table.tp * min(alone, shared)


def _reachable(table: ProfileTable, phase: str, model: ModelSpec, spec: GpuSpec, config: ClusterConfig,
               batch: FloatArray, context: FloatArray) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    """Per sub-box: whether a run can step inside it, and the least memory fraction per GPU that needs.

    Two or more sequences must fit their KV cache (batch x context tokens, at least) beside the
    weights, and two or more prompts the prefill budget; a lone sequence may overrun both.
    """
    batch_lo = _over_corners(batch, np.minimum)
    context_lo = _over_corners(context, np.minimum)
    context_lo = np.where(context_lo <= table.axes[1][0], 0.0, context_lo)  # clamped up from anything below
    several = batch_lo > 1.0
    kv_tokens = np.where(several, batch_lo * context_lo, 0.0)
    memory_frac = (model.weights_bytes + kv_tokens * model.kv_bytes_per_token) / table.tp / (
        spec.memory_bytes * config.usable_memory_frac)
    reachable = memory_frac <= 1.0
    if phase == "prefill":
        reachable &= ~several | (batch_lo * context_lo <= config.step_token_budget)
    return reachable, memory_frac


def _mccormick_floor(dynamic_w: FloatArray, latency_s: FloatArray, tokens: FloatArray,
                     boxes: npt.NDArray[np.bool_]) -> float:
    """Least (dynamic power x latency / tokens) over the marked sub-boxes, interpolation included.

    On a box, d*l >= d_lo*l + l_lo*d - d_lo*l_lo and >= d_hi*l + l_hi*d - d_hi*l_hi (McCormick);
    both right sides are multilinear, and divided by a linear batch (or bilinear batch x context)
    their minimum over the box is at a corner.
    """
    index = np.nonzero(boxes)
    if not len(index[0]):
        return math.inf
    corners = list(itertools.product((0, 1), repeat=4))
    at = [tuple(i + b for i, b in zip(index, bits)) for bits in corners]
    d = np.stack([dynamic_w[c] for c in at])
    lat = np.stack([latency_s[c] for c in at])
    tok = np.stack([tokens[c] for c in at])
    d_lo, d_hi, l_lo, l_hi = d.min(axis=0), d.max(axis=0), lat.min(axis=0), lat.max(axis=0)
    under_lo = ((d_lo * lat + l_lo * d - d_lo * l_lo) / tok).min(axis=0)
    under_hi = ((d_hi * lat + l_hi * d - d_hi * l_hi) / tok).min(axis=0)
    return float(np.min(np.maximum(under_lo, under_hi)))


def _over_corners(values: FloatArray, reduce: Any) -> FloatArray:
    """Each sub-box's minimum or maximum over its corners."""
    out = values
    for k in range(values.ndim):
        lo = tuple(slice(None, -1) if j == k else slice(None) for j in range(values.ndim))
        hi = tuple(slice(1, None) if j == k else slice(None) for j in range(values.ndim))
        out = reduce(out[lo], out[hi])
    return out


def _refine_axis(axis: Sequence[float], refine: int) -> FloatArray:
    """``refine`` equal steps per grid interval; a one-point axis becomes a zero-width box."""
    a = np.asarray(axis, dtype=np.float64)
    if len(a) == 1:
        return np.array([a[0], a[0]])
    steps = np.arange(refine) / refine
    inner = (a[:-1, None] + (a[1:] - a[:-1])[:, None] * steps[None, :]).ravel()
    return np.append(inner, a[-1])


def _interpolate(values: FloatArray, axes: Sequence[Sequence[float]], new_axes: Sequence[FloatArray]) -> FloatArray:
    """The table's multilinear interpolation onto a finer grid: one 1-D linear map per axis."""
    out = values
    for k, (old, new) in enumerate(zip(axes, new_axes)):
        old_a = np.asarray(old, dtype=np.float64)
        weights = np.zeros((len(new), len(old_a)))
        if len(old_a) == 1:
            weights[:, 0] = 1.0
        else:
            i = np.clip(np.searchsorted(old_a, new, side="right") - 1, 0, len(old_a) - 2)
            w = (new - old_a[i]) / (old_a[i + 1] - old_a[i])
            weights[np.arange(len(new)), i] = 1.0 - w
            weights[np.arange(len(new)), i + 1] += w
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [k])), 0, k)
    return out
