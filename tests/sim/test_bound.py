"""The energy floor: below every policy's simulated energy, and each of its terms checked on its own."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import festina_hpc.sim
from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.config import default_profiles_dir
from festina_hpc.policy.base import Policy, PolicyContext, make_policy, policy_names
from festina_hpc.policy.common import least_loaded, serving
from festina_hpc.policy.types import (
    ClusterView,
    Drop,
    GpuSettings,
    GpuView,
    InstancePhase,
    NodePower,
    Placement,
    Plan,
    PowerOff,
    PowerOn,
    Request,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import PHASES, ProfileTable
from festina_hpc.sim.bound import METHOD, energy_lower_bound, token_energy_floor_j
from festina_hpc.sim.simulator import ENERGY_PARTS, SimResult, Simulation
from tests.sim.conftest import MODELS, poisson_requests, slos

STORE = ProfileStore(default_profiles_dir())
GPU = "h100-sxm-80gb"
SPEC = STORE.gpu(GPU)
TRACES = (Path(festina_hpc.sim.__file__).parent / "traces" / "azure_2023_conv.csv",
          Path("/work/shared/data/azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv"))


def bursts(count: int, gap_s: float, seed: int, models: tuple[str, ...] = MODELS) -> list[Request]:
    """``count`` bursts of 40 requests at 20/s, ``gap_s`` apart: long idle stretches between them."""
    out: list[Request] = []
    for k in range(count):
        out += poisson_requests(40, 20.0, seed + k, models, start_s=k * gap_s, first_id=len(out))
    return out


class PackedPolicy(Policy):
    """Packs instances onto GPUs with MPS shares and small memory fractions, at a fixed low clock.

    The opposite of vllm's choices: big batches, co-resident instances whose summed dynamic power
    the simulator caps at TDP, and low clocks; the floor must stay below it too.
    """

    name = "test-packed"

    def __init__(self, context: PolicyContext, sm_pct: float, clock_mhz: int, kv_frac: float):
        super().__init__(context)
        self.sm_pct, self.clock_mhz, self.kv_frac = sm_pct, clock_mhz, kv_frac

    def place(self, request: Request, view: ClusterView) -> Placement:
        model = view.model(request.model)
        candidates = serving(view.instances_of(request.model))
        roomy = [i for i in candidates if i.running + i.waiting < i.batch_cap]
        if roomy:
            return Route(max(roomy, key=lambda i: i.running + i.waiting).id)
        usable = self.gpu_spec.memory_bytes * 0.9
        fraction = min(1.0, model.weights_bytes_per_gpu / usable + self.kv_frac)
        for node in view.nodes():
            gpus = [g for g in node.gpus if view.gpu(g).memory_fraction_allocated + fraction <= 1.0
                    and view.gpu(g).sm_pct_allocated + self.sm_pct <= 100.0]
            if len(gpus) >= model.tp:
                return StartInstance(request.model, tuple(gpus[:model.tp]), sm_pct=self.sm_pct, batch_cap=512,
                                     memory_fraction=fraction)
        fallback = least_loaded(candidates)
        return Route(fallback.id) if fallback is not None else Drop("no room")

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        return GpuSettings(clock_mhz=self.clock_mhz)


class FrugalPolicy(Policy):
    """Scales to zero at once and powers off every empty node: pays for little beyond the requests."""

    name = "test-frugal"
    scale_period_s = 1.0
    consolidate_period_s = 1.0

    def place(self, request: Request, view: ClusterView) -> Placement:
        model = view.model(request.model)
        best = least_loaded(serving(view.instances_of(request.model)))
        if best is not None:
            return Route(best.id)
        for node in view.nodes():
            free = [g for g in node.gpus if not view.gpu(g).instances]
            if len(free) >= model.tp:
                return StartInstance(request.model, tuple(free[:model.tp]))
        return Drop("no room")

    def scale(self, view: ClusterView) -> Plan:
        return Plan(tuple(StopInstance(i.id) for i in view.instances()
                          if i.phase is InstancePhase.READY and i.running == 0 and i.waiting == 0))

    def consolidate(self, view: ClusterView) -> Plan:
        return Plan(tuple(PowerOff(n.id) for n in view.nodes()
                          if n.power is not NodePower.OFF and not any(view.gpu(g).instances for g in n.gpus)))


class OraclePolicy(Policy):
    """Knows when each burst comes: resumes node 0 just in time for its resume and a load before the
    burst, loads the model just before it, stops it and powers every node off between bursts. It
    meets TTFT SLOs while paying for little else: the run terms 4 and 5 must stay below."""

    name = "test-oracle"
    scale_period_s = 0.5
    consolidate_period_s = 0.5

    def __init__(self, context: PolicyContext, model: str, bursts_s: list[tuple[float, float]], resume_s: float):
        super().__init__(context)
        self.model, self.bursts_s, self.resume_s = model, bursts_s, resume_s
        self.lead_s = 20.0  # a standard load (16.4 s for an 8B model) and a control period, with room to spare

    def _next_burst_s(self, now_s: float) -> float:
        """The start of the burst under way or next; inf after the last."""
        return min((start for start, end in self.bursts_s if end >= now_s), default=math.inf)

    def _busy(self, now_s: float) -> bool:
        return any(start - self.lead_s <= now_s <= end for start, end in self.bursts_s)

    def place(self, request: Request, view: ClusterView) -> Placement:
        best = least_loaded(serving(view.instances_of(request.model)))
        if best is not None:
            return Route(best.id)
        return StartInstance(request.model, (0,))

    def scale(self, view: ClusterView) -> Plan:
        now_s = view.now_s
        instances = view.instances_of(self.model)
        if self._busy(now_s) and not instances and view.node(0).power is NodePower.ON:
            return Plan((StartInstance(self.model, (0,)),))
        if not self._busy(now_s):
            return Plan(tuple(StopInstance(i.id) for i in instances
                              if i.phase is InstancePhase.READY and i.running == 0 and i.waiting == 0))
        return Plan(())

    def consolidate(self, view: ClusterView) -> Plan:
        now_s = view.now_s
        actions: list[PowerOff | PowerOn] = []
        for node in view.nodes():
            empty = not any(view.gpu(g).instances for g in node.gpus)
            wanted = node.id == 0 and self._next_burst_s(now_s) - now_s <= self.resume_s + self.lead_s
            if node.power is NodePower.OFF and wanted:
                actions.append(PowerOn(node.id))
            elif node.power is NodePower.ON and empty and not wanted:
                actions.append(PowerOff(node.id))
        return Plan(tuple(actions))


def vllm(context: PolicyContext) -> Policy:
    return make_policy("vllm", context)


def packed(sm_pct: float, clock_mhz: int, kv_frac: float) -> Callable[[PolicyContext], Policy]:
    return lambda context: PackedPolicy(context, sm_pct, clock_mhz, kv_frac)


def frugal(context: PolicyContext) -> Policy:
    return FrugalPolicy(context)


def check_floor(requests: list[Request], cluster: ClusterConfig,
                policy: Callable[[PolicyContext], Policy]) -> SimResult:
    """Run the policy; its energy is at least the floor of the requests it served (all, when it drops none),
    terms 4 and 5 counting those that met their TTFT SLO."""
    models = sorted({r.model for r in requests})
    sim = Simulation(cluster, STORE, policy(PolicyContext(STORE, GPU)), requests, slos(models))
    result = sim.run()
    first_token_s = {rec.request.id: rec.first_token_s for rec in sim.records}
    served = [rec.request for rec in sim.records if not rec.dropped and not math.isnan(rec.finish_s)]
    targets = slos(models)
    met = {r.id for r in served if first_token_s[r.id] - r.arrival_s <= targets[r.model].ttft_for(r.prompt_tokens)}
    bound = energy_lower_bound(served, STORE, cluster, targets, ttft_met=met)
    assert bound.energy_j <= result.energy_j, (bound.energy_parts_j, result.energy_parts_j)
    assert bound.node_hours_powered <= result.node_hours_powered
    return result


ONE_NODE = ClusterConfig(nodes=1, gpus_per_node=8)


@pytest.mark.parametrize("case, requests, cluster, policy", [
    ("vllm, one model, steady", poisson_requests(300, 2.0, 1, ("llama-3.1-8b",)), ONE_NODE, vllm),
    ("vllm, three models", poisson_requests(500, 6.0, 2), ONE_NODE, vllm),
    ("vllm, 70b and 8b on two 4-GPU nodes", poisson_requests(200, 1.0, 3, ("llama-3.1-70b", "llama-3.1-8b")),
     ClusterConfig(nodes=2, gpus_per_node=4), vllm),
    ("vllm, bursts and idle gaps", bursts(3, 600.0, 4), ONE_NODE, vllm),
    ("packed: MPS shares, low clock, big batches", poisson_requests(500, 8.0, 5), ONE_NODE, packed(30, 900, 0.1)),
    ("packed: small shares, memory-tight", poisson_requests(500, 8.0, 6), ONE_NODE, packed(20, 1380, 0.02)),
    ("frugal: scale to zero, power nodes off", bursts(3, 900.0, 7), ClusterConfig(nodes=2, gpus_per_node=8),
     frugal),
    ("frugal: bursts closer than the resume time", bursts(4, 200.0, 9), ClusterConfig(nodes=2, gpus_per_node=8),
     frugal),
    ("frugal: bursts, instant resume", bursts(4, 200.0, 10), ClusterConfig(nodes=2, resume_time_s=0.0), frugal),
])
def test_floor_is_below_every_policy(case: str, requests: list[Request], cluster: ClusterConfig,
                                     policy: Callable[[PolicyContext], Policy]) -> None:
    result = check_floor(requests, cluster, policy)
    assert result.requests_dropped == 0, result.drop_reasons  # so the floor was the whole workload's


def test_token_floor_is_nearly_reached_at_the_most_efficient_point() -> None:
    """512 short requests at once, one instance at the table's most efficient clock and batch: the
    run's serving energy is within 30% of the token floor (the context grows as it decodes)."""
    model = "llama-3.1-8b"
    table = STORE.table(GPU, model)
    decode = PHASES.index("decode")
    per_token = (table.power_w[decode] - SPEC.idle_w) * table.latency_s[decode] / np.array(
        table.axes[0])[:, None, None, None]
    best = np.unravel_index(np.argmin(per_token), per_token.shape)
    requests = [Request(i, 0.0, model, 128, 300) for i in range(int(table.axes[0][best[0]]))]
    result = check_floor(requests, ONE_NODE, packed(100, int(table.axes[3][best[3]]), 0.7))
    bound = energy_lower_bound(requests, STORE, ONE_NODE, slos([model]))
    assert result.requests_dropped == 0
    assert bound.energy_parts_j["gpu_active_j"] <= result.energy_parts_j["gpu_active_j"]
    assert result.energy_parts_j["gpu_active_j"] <= 1.3 * bound.energy_parts_j["gpu_active_j"]


def azure_conv_slice(duration_s: float, models: tuple[str, ...]) -> list[Request]:
    path = next((p for p in TRACES if p.is_file()), None)
    if path is None:
        pytest.skip("the Azure conv trace is not here")
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, len(models) + 1)
    chosen = rng.choice(len(models), size=len(rows), p=weights / weights.sum())
    requests = []
    for i, row in enumerate(rows):
        arrival_s = (datetime.fromisoformat(row["TIMESTAMP"][:26]) - t0).total_seconds()
        if arrival_s >= duration_s:
            break
        requests.append(Request(i, arrival_s, models[chosen[i]], int(row["ContextTokens"]),
                                max(1, int(row["GeneratedTokens"]))))
    return requests


AZURE_POLICIES = {**{name: (lambda context, name=name: make_policy(name, context)) for name in policy_names()},
                  "packed": packed(50, 1380, 0.2)}


@pytest.mark.parametrize("name", sorted(AZURE_POLICIES))
def test_floor_is_below_every_policy_on_ten_minutes_of_azure_conv(name: str) -> None:
    requests = azure_conv_slice(600.0, ("llama-3.1-8b", "mistral-7b", "llama-2-13b", "codellama-34b"))
    assert len(requests) > 1000
    result = check_floor(requests, ONE_NODE, AZURE_POLICIES[name])
    if name == "vllm":
        assert result.requests_dropped == 0


# -- term 1: tokens ----------------------------------------------------------------------------


def reachable_points(table: ProfileTable, phase: str, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Random points inside the table a run can step at (see METHOD), clocks from the supported ones."""
    rng = np.random.default_rng(seed)
    (b0, b1), (c0, c1), (s0, s1), (k0, k1) = (table.bounds(f) for f in
                                              ("batch", "context_tokens", "sm_pct", "clock_mhz"))
    batch = rng.integers(int(b0), int(b1) + 1, n).astype(float)
    context = np.exp(rng.uniform(np.log(c0), np.log(c1), n))
    sm = rng.uniform(s0, s1, n)
    clocks = np.array([c for c in SPEC.supported_clocks_mhz if k0 <= c <= k1], dtype=float)
    clock = rng.choice(clocks, n)
    model = STORE.model(table.model)
    usable = SPEC.memory_bytes * ONE_NODE.usable_memory_frac
    fits = (model.weights_bytes + batch * context * model.kv_bytes_per_token) / table.tp <= usable
    if phase == "prefill":
        fits &= batch * context <= ONE_NODE.step_token_budget
    keep = fits | (batch == 1)
    return batch[keep], context[keep], sm[keep], clock[keep]


@pytest.mark.parametrize("model", ["llama-3.1-8b", "codellama-34b", "llama-3.1-70b"])
@pytest.mark.parametrize("phase", PHASES)
def test_token_floor_is_below_every_reachable_point(model: str, phase: str) -> None:
    table = STORE.table(GPU, model)
    floor = token_energy_floor_j(table, phase, SPEC, STORE.model(model), ONE_NODE)
    batch, context, sm, clock = reachable_points(table, phase, 50_000, seed=len(model))
    hit = table.lookup_many(phase, batch, context, sm, clock)
    tokens = batch * context if phase == "prefill" else batch
    per_token = (hit.power_w - SPEC.idle_w) * hit.latency_s * table.tp / tokens
    assert 0.0 < floor <= per_token.min()
    # ... and at every grid point a run can reach.
    b, c = (a[:, :, None, None] for a in np.meshgrid(*table.axes[:2], indexing="ij"))
    tokens = b * c if phase == "prefill" else b
    p = PHASES.index(phase)
    at_grid = (table.power_w[p] - SPEC.idle_w) * table.latency_s[p] * table.tp / tokens
    spec = STORE.model(model)
    usable = SPEC.memory_bytes * ONE_NODE.usable_memory_frac
    fits = (spec.weights_bytes + b * c * spec.kv_bytes_per_token) / table.tp <= usable
    if phase == "prefill":
        fits &= b * c <= ONE_NODE.step_token_budget
    assert floor <= np.min(np.where(fits | (b == 1), at_grid, np.inf)) * (1 + 1e-12)


def test_token_floor_catches_the_dip_between_grid_points() -> None:
    """Power and latency both doubling from batch 1 to 4: per token, the grid says 1 at both ends,
    but the interpolation reaches (1 + t)^2 / (1 + 3t), least 8/9 at batch 2."""
    dynamic_w, latency_s = 100.0, 0.01
    power = np.array([[SPEC.idle_w + dynamic_w], [SPEC.idle_w + 2 * dynamic_w]]).reshape(2, 1, 1, 1)
    latency = np.array([[latency_s], [2 * latency_s]]).reshape(2, 1, 1, 1)
    # llama-3.1-70b (tp 4): its weights take enough of each GPU that the TDP-sharing cap stays out of the way.
    table = ProfileTable(GPU, "llama-3.1-70b", 4, [[1, 4], [128], [100], [1980]],
                         np.stack([latency, latency]), np.stack([power, power]))
    floor = token_energy_floor_j(table, "decode", SPEC, STORE.model("llama-3.1-70b"), ONE_NODE)
    grid_value = dynamic_w * latency_s * 4
    assert floor <= grid_value * 8 / 9
    assert floor >= grid_value * 0.85  # and it is not much below the true least value


def test_token_floor_counts_prompts_capped_at_the_top_context() -> None:
    top = STORE.table(GPU, "llama-3.1-8b").bounds("context_tokens")[1]
    long = Request(0, 0.0, "llama-3.1-8b", int(3 * top), 1)
    bound = energy_lower_bound([long], STORE, ONE_NODE, slos(["llama-3.1-8b"]))
    assert bound.per_model["llama-3.1-8b"]["prefill_tokens"] == top
    assert bound.per_model["llama-3.1-8b"]["decode_tokens"] == 0


# -- term 2: powered nodes (terms 4 and 5 left out: no request is taken to meet its TTFT) -------


def least_service_s(model: str, output_tokens: int) -> float:
    table = STORE.table(GPU, model)
    return float(table.latency_s[0].min() + (output_tokens - 1) * table.latency_s[1].min())


def test_powered_nodes_cover_the_union_of_least_service_intervals() -> None:
    model = "llama-3.1-8b"
    requests = [Request(0, 0.0, model, 100, 11), Request(1, 0.05, model, 100, 1), Request(2, 100.0, model, 100, 1)]
    first = least_service_s(model, 11)
    second_end = 0.05 + least_service_s(model, 1)
    in_flight_s = max(first, second_end) + least_service_s(model, 1)
    bound = energy_lower_bound(requests, STORE, ONE_NODE, slos([model]), ttft_met=())
    assert bound.in_flight_s == pytest.approx(in_flight_s)
    assert bound.node_hours_powered * 3600 == pytest.approx(in_flight_s)
    assert bound.energy_parts_j["gpu_idle_j"] == pytest.approx(8 * SPEC.idle_w * in_flight_s)
    assert bound.energy_parts_j["node_static_j"] == pytest.approx(8 * ONE_NODE.node_static_w_per_gpu * in_flight_s)
    assert bound.horizon_s == pytest.approx(100.0 + least_service_s(model, 1))


def test_powered_nodes_count_whole_nodes_for_tp_and_for_weights() -> None:
    # llama-3.1-70b needs 4 GPUs: two 2-GPU nodes. With codellama-34b and llama-2-70b in flight too,
    # the weights need 5 GPUs: two 4-GPU nodes, where one suffices for llama-3.1-70b alone.
    alone = [Request(0, 0.0, "llama-3.1-70b", 100, 101)]
    bound = energy_lower_bound(alone, STORE, ClusterConfig(nodes=4, gpus_per_node=2), slos(["llama-3.1-70b"]),
                               ttft_met=())
    assert bound.node_hours_powered == pytest.approx(2 * bound.in_flight_s / 3600)
    together = alone + [Request(1, 0.0, "codellama-34b", 100, 101), Request(2, 0.0, "llama-2-70b", 100, 101)]
    shortest = min(least_service_s(r.model, 101) for r in together)
    longest = max(least_service_s(r.model, 101) for r in together)
    cluster = ClusterConfig(nodes=2, gpus_per_node=4)
    bound = energy_lower_bound(together, STORE, cluster, slos(r.model for r in together), ttft_met=())
    assert bound.in_flight_s == pytest.approx(longest)
    assert bound.node_hours_powered * 3600 >= 2 * shortest - 1e-9
    assert bound.node_hours_powered * 3600 < 2 * longest


def test_off_nodes_draw_their_standby_power_over_the_horizon() -> None:
    model = "llama-3.1-8b"
    requests = [Request(0, 0.0, model, 100, 1), Request(1, 50.0, model, 100, 1)]
    plain = energy_lower_bound(requests, STORE, ClusterConfig(nodes=3, standby_w=0.0), slos([model]), ttft_met=())
    standby = energy_lower_bound(requests, STORE, ClusterConfig(nodes=3, standby_w=20.0), slos([model]), ttft_met=())
    extra_j = standby.energy_j - plain.energy_j
    # Every node draws 20 W for the horizon; the powered node-seconds draw it in place of it.
    assert extra_j == pytest.approx(20.0 * (3 * plain.horizon_s - plain.node_hours_powered * 3600))


# -- terms 4 and 5: loaded models, wake time --------------------------------------------------


def least_prefill_s(model: str) -> float:
    return float(STORE.table(GPU, model).latency_s[0].min())


def lead_s(model: str, cluster: ClusterConfig, prompt_tokens: int = 100) -> float:
    """How long before its arrival a request that meets its TTFT SLO has its model loaded on a node
    that is on: the fastest load (of the simulator's three loaders) plus the least prefill, less the SLO."""
    spec = STORE.model(model)
    per_gpu_gb = spec.weights_bytes / spec.tp_on(GPU) / 1e9
    load_s = min(cluster.load_init_s + per_gpu_gb / cluster.load_gbs,
                 cluster.fast_load_init_s + per_gpu_gb / cluster.fast_load_gbs,
                 cluster.fast_load_init_s + per_gpu_gb / cluster.host_cache_gbs)
    return load_s + least_prefill_s(model) - slos([model])[model].ttft_for(prompt_tokens)


NO_WAKE = ClusterConfig(nodes=1, gpus_per_node=8, resume_time_s=0.0)


def test_a_model_asked_for_again_sooner_than_a_reload_stays_loaded() -> None:
    """Two one-token requests 1 s apart: term 2 counts their two prefills; a reload takes longer
    than 1 s plus the SLO, so the model (and its node) stays up from before the first to the second."""
    model = "llama-3.1-8b"
    requests = [Request(0, 100.0, model, 100, 1), Request(1, 101.0, model, 100, 1)]
    lead = lead_s(model, NO_WAKE)
    assert 1.0 < lead < 100.0
    bound = energy_lower_bound(requests, STORE, NO_WAKE, slos([model]))
    assert bound.node_hours_powered * 3600 == pytest.approx(101.0 + least_prefill_s(model) - (100.0 - lead))
    unmet = energy_lower_bound(requests, STORE, NO_WAKE, slos([model]), ttft_met=())
    assert unmet.node_hours_powered * 3600 == pytest.approx(2 * least_prefill_s(model))  # term 2 alone
    assert bound.terms_j["loaded_models"] == pytest.approx(
        (bound.node_hours_powered - unmet.node_hours_powered) * 3600 * (8 * (SPEC.idle_w + 150.0) - 30.0))
    assert bound.terms_j["wake_time"] == 0.0


def test_models_that_must_stay_loaded_together_share_gpu_memory() -> None:
    """Four small models asked for 0.3 s apart, one GPU per node: each alone fits a GPU (so term 2
    needs one node), but while all four must be loaded their weights need two GPUs, two nodes."""
    models = ("llama-3.1-8b", "llama-2-13b", "mistral-nemo-12b", "mistral-7b")
    weights = [STORE.model(m).weights_bytes for m in models]
    usable = SPEC.memory_bytes * 0.9
    assert max(sum(weights) - w for w in weights) <= usable < sum(weights)
    cluster = ClusterConfig(nodes=4, gpus_per_node=1, resume_time_s=0.0)
    requests = [Request(k, 100.0 + 0.3 * k, m, 100, 1) for k, m in enumerate(models)]
    windows = [(r.arrival_s - lead_s(r.model, cluster), r.arrival_s + least_prefill_s(r.model)) for r in requests]
    all_four_s = min(end for _, end in windows) - max(start for start, _ in windows)
    assert all_four_s > 0.0
    union_s = max(end for _, end in windows) - min(start for start, _ in windows)
    bound = energy_lower_bound(requests, STORE, cluster, slos(models))
    assert bound.node_hours_powered * 3600 == pytest.approx(union_s + all_four_s)
    assert energy_lower_bound(requests, STORE, cluster, slos(models), ttft_met=()).node_hours_powered * 3600 == (
        pytest.approx(sum(least_prefill_s(m) for m in models)))


@pytest.mark.parametrize("gap_s", [100.0, 1000.0])
def test_a_node_that_must_be_on_was_resumed_a_resume_time_before(gap_s: float) -> None:
    """A request that meets its TTFT needs its node on from lead_s before it arrives, and a node on
    at t was powered since t - resume_time_s: two requests closer than that keep it up between them."""
    model = "llama-3.1-8b"
    resume_s = ONE_NODE.resume_time_s
    requests = [Request(0, 1000.0, model, 100, 1), Request(1, 1000.0 + gap_s, model, 100, 1)]
    up_s = resume_s + lead_s(model, ONE_NODE) + least_prefill_s(model)  # each request alone
    bound = energy_lower_bound(requests, STORE, ONE_NODE, slos([model]))
    expected_s = up_s + min(gap_s, up_s)
    assert bound.node_hours_powered * 3600 == pytest.approx(expected_s)
    assert bound.terms_j["wake_time"] > 0.0
    # Today's floor (term 2) counted the two prefills alone.
    assert energy_lower_bound(requests, STORE, ONE_NODE, slos([model]), ttft_met=()).node_hours_powered * 3600 == (
        pytest.approx(2 * least_prefill_s(model)))


def test_wake_time_counts_every_node_that_must_be_on() -> None:
    """Two 70B models at once on 4-GPU nodes with room for one of them per node: both nodes are on
    when they serve, so both were powered for the resume time before; a request that missed its TTFT
    is held (term 2) but adds no wake time."""
    models = ("llama-3.1-70b", "llama-2-70b")
    cluster = ClusterConfig(nodes=3, gpus_per_node=4, usable_memory_frac=0.5)
    usable = SPEC.memory_bytes * cluster.usable_memory_frac
    assert sum(STORE.model(m).weights_bytes for m in models) > 4 * usable
    resume_s = cluster.resume_time_s
    requests = [Request(k, 1000.0, m, 100, 1) for k, m in enumerate(models)]
    ends = [1000.0 + least_prefill_s(m) for m in models]
    starts = [1000.0 - lead_s(m, cluster) - resume_s for m in models]
    bound = energy_lower_bound(requests, STORE, cluster, slos(models))
    both_s = min(ends) - max(starts)
    assert bound.node_hours_powered * 3600 == pytest.approx(max(ends) - min(starts) + both_s)
    one = energy_lower_bound(requests, STORE, cluster, slos(models), ttft_met={1})
    # llama-2-70b's node from its wake; llama-3.1-70b's node only while both are held.
    assert one.node_hours_powered * 3600 == pytest.approx(max(ends) - starts[1] + min(ends) - 1000.0)


@pytest.mark.parametrize("gap_s", [400.0, 1500.0])
def test_floor_is_below_a_policy_that_resumes_and_loads_just_in_time(gap_s: float) -> None:
    """Bursts of one model further apart than a resume: the oracle meets the TTFTs of every burst
    but the first (its load is under way then) with its node off between bursts; the floor, terms 4
    and 5 counting those requests, stays below it and close to its powered node-hours."""
    model = "llama-3.1-8b"
    requests: list[Request] = []
    for k in range(3):
        requests += poisson_requests(20, 1.0, 11 + k, (model,), start_s=k * gap_s, first_id=len(requests))
    spans = [(requests[20 * k].arrival_s, requests[20 * k + 19].arrival_s) for k in range(3)]
    cluster = ClusterConfig(nodes=2, gpus_per_node=8)
    result = check_floor(requests, cluster,
                         lambda context: OraclePolicy(context, model, spans, cluster.resume_time_s))
    assert result.requests_dropped == 0 and result.ttft_attainment > 0.6
    assert result.node_hours_powered < 0.25  # two resumes and three bursts, not the whole run
    bound = energy_lower_bound(requests, STORE, cluster, slos([model]))
    assert bound.terms_j["wake_time"] > 0.0 and bound.node_hours_powered > 0.85 * result.node_hours_powered


class FlickerPolicy(Policy):
    """Resumes node 1 at 20 s, powers it off at 30 s while it wakes, resumes it at 40 s."""

    name = "test-flicker"
    consolidate_period_s = 10.0

    def __init__(self, context: PolicyContext):
        super().__init__(context)
        self.seen: list[tuple[float, NodePower]] = []

    def place(self, request: Request, view: ClusterView) -> Placement:
        return Drop("not served")

    def consolidate(self, view: ClusterView) -> Plan:
        self.seen.append((view.now_s, view.node(1).power))
        action = {10.0: PowerOff(1), 20.0: PowerOn(1), 30.0: PowerOff(1), 40.0: PowerOn(1)}.get(view.now_s)
        return Plan((action,) if action is not None else ())


def test_a_node_resumed_again_is_on_a_resume_time_after_its_last_resume() -> None:
    """Term 5's premise: the first resume's readiness (at 320 s) must not bring up the node resumed
    again at 40 s, which is on only from 340 s."""
    policy = FlickerPolicy(PolicyContext(STORE, GPU))
    Simulation(ClusterConfig(nodes=2), STORE, policy, [Request(0, 400.0, "llama-3.1-8b", 10, 1)],
               slos(["llama-3.1-8b"])).run()
    on_s = min(t for t, power in policy.seen if t > 40.0 and power is NodePower.ON)
    assert on_s >= 40.0 + ClusterConfig().resume_time_s


# -- the result --------------------------------------------------------------------------------


def test_bound_as_dict_is_json_and_adds_up() -> None:
    requests = poisson_requests(50, 2.0, 8)
    bound = energy_lower_bound(requests, STORE, ONE_NODE, slos(MODELS + ("llama-2-13b",)))
    data = json.loads(json.dumps(bound.as_dict()))
    assert data["energy_j"] == pytest.approx(sum(data["energy_parts_j"].values()))
    assert data["method"] == METHOD
    assert data["policy"] == "bound"
    assert set(data["energy_parts_j"]) == set(ENERGY_PARTS)
    assert data["energy_j"] == pytest.approx(sum(t["energy_j"] for t in data["terms"].values()))
    assert set(data["terms"]) == {"tokens", "standby", "in_flight", "loaded_models", "wake_time"}
    assert data["ttft_met"] == len(requests)
    assert data["per_model"]["llama-2-13b"]["requests"] == 0  # listed for its SLO, no traffic
    assert data["generated_tokens"] == sum(r.output_tokens for r in requests)
    assert sum(m["requests"] for m in data["per_model"].values()) == len(requests)
    assert all(math.isfinite(v) for v in data["energy_parts_j"].values())


def test_empty_workload_has_a_zero_floor() -> None:
    bound = energy_lower_bound([], STORE, ONE_NODE, {})
    assert bound.energy_j == 0.0
    assert bound.in_flight_s == 0.0
