"""The simulator's conservation laws and determinism, on the shipped profiles."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import pytest

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.config import default_profiles_dir
from festina_hpc.policy.base import Policy, PolicyContext, make_policy
from festina_hpc.policy.common import free_gpu_group, least_loaded, serving
from festina_hpc.policy.types import (
    Arrival,
    ClusterView,
    Drop,
    EndedRequest,
    Ending,
    InstancePhase,
    NodePower,
    Placement,
    Plan,
    PowerOff,
    Request,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.engine import Event
from festina_hpc.sim.simulator import SimResult, Simulation
from tests.sim.conftest import poisson_requests as sim_requests
from tests.sim.conftest import slos

STORE = ProfileStore(default_profiles_dir())
GPU = "h100-sxm-80gb"


def poisson_requests(n: int, rate_per_s: float, seed: int) -> list[Request]:
    return sim_requests(n, rate_per_s, seed, min_prompt_tokens=50)


class CheckedSimulation(Simulation):
    """Checks the cluster's invariants after every event."""

    def _handle(self, e: Event) -> Iterable[Event]:
        events = list(super()._handle(e))
        usable = self.spec.memory_bytes * self.config.usable_memory_frac
        for gpu in self.gpu_list:
            assert gpu.memory_fraction_allocated <= 1 + 1e-9
            assert gpu.sm_pct_allocated <= 100 + 1e-9
            weights = sum(self.live[i].info.weights_bytes_per_gpu for i in gpu.instances
                          if not self.live[i].waits_for_memory)  # a share restart waiting for memory holds none yet
            kv = sum(self.live[i].kv_tokens_reserved * self.live[i].info.kv_bytes_per_token_per_gpu
                     for i in gpu.instances if self.live[i].running > 1)
            assert weights + kv <= usable * gpu.memory_fraction_allocated + 1e-6
        for inst in self.live.values():
            if inst.phase is InstancePhase.READY and inst.holds_work:
                assert self.node_list[inst.node].power is NodePower.ON
            assert inst.kv_tokens_reserved >= 0
        return events


def simulate(policy: Policy | str, requests: list[Request], nodes: int = 1, gpus_per_node: int = 8,
             checked: bool = True) -> SimResult:
    if isinstance(policy, str):
        policy = make_policy(policy, PolicyContext(STORE, GPU))
    cls = CheckedSimulation if checked else Simulation
    return cls(ClusterConfig(nodes=nodes, gpus_per_node=gpus_per_node), STORE, policy, requests,
               slos({r.model for r in requests})).run()


def test_every_request_is_completed_or_dropped() -> None:
    requests = poisson_requests(400, 4.0, seed=1)
    result = simulate("vllm", requests, gpus_per_node=2)  # too few GPUs for three models: some wait
    assert result.requests_completed + result.requests_dropped == result.requests_total == 400
    assert result.requests_completed > 0


def test_same_seed_same_result_and_a_different_seed_differs() -> None:
    a = simulate("vllm", poisson_requests(300, 3.0, seed=7)).as_dict()
    b = simulate("vllm", poisson_requests(300, 3.0, seed=7)).as_dict()
    c = simulate("vllm", poisson_requests(300, 3.0, seed=8)).as_dict()
    for d in (a, b, c):
        d.pop("sim_wall_s")
    assert a == b and a != c


def test_energy_is_the_integral_of_power_for_one_request() -> None:
    """One request, one GPU: the model deployed at 0, idle and static power all along, one prefill, decode;
    loaded and waiting, the GPU draws its idle power with a CUDA context held."""
    config = ClusterConfig(nodes=1, gpus_per_node=1)
    request = Request(0, 100.0, "llama-3.1-8b", 1000, 11)
    result = simulate("vllm", [request], gpus_per_node=1)
    spec = STORE.gpu(GPU)
    load_s = config.load_init_s + STORE.model("llama-3.1-8b").weights_bytes / 1e9 / config.load_gbs
    prefill = STORE.predict(GPU, "llama-3.1-8b", "prefill", 1, 1000)
    decode = STORE.table(GPU, "llama-3.1-8b").lookup("decode", 1, 1000 + 5, 100, spec.max_clock_mhz)
    assert load_s < 100.0  # vllm deploys the model up front: loaded before the request arrives
    end_s = 100.0 + prefill.latency_s + 10 * decode.latency_s
    assert result.sim_time_s == pytest.approx(end_s, rel=1e-9)
    expected = {
        "gpu_idle_j": spec.idle_with_context_w * (100.0 - load_s) + spec.idle_w * (end_s - 100.0),
        "cold_start_j": (spec.idle_w + config.load_dynamic_w) * load_s,
        "gpu_active_j": (prefill.power_w - spec.idle_w) * prefill.latency_s
        + (decode.power_w - spec.idle_w) * 10 * decode.latency_s,
        "node_static_j": config.node_static_w_per_gpu * end_s,
        "migration_j": 0.0,
        "share_restart_j": 0.0,
        "standby_j": 0.0,
    }
    assert result.energy_parts_j == pytest.approx(expected, rel=1e-9)
    assert result.energy_j == pytest.approx(sum(expected.values()), rel=1e-12)
    ttft = prefill.latency_s
    assert result.ttft_p50_s == pytest.approx(ttft) and result.tbt_p50_s == pytest.approx(decode.latency_s)


class PowerCyclingPolicy(Policy):
    """Whole GPUs; stops idle instances and powers empty nodes off, so starts must wake nodes."""

    name = "test-power-cycling"
    scale_period_s = 2.0
    consolidate_period_s = 5.0

    def place(self, request: Request, view: ClusterView) -> Placement:
        best = least_loaded(serving(view.instances_of(request.model)))
        if best is not None:
            return Route(best.id)
        tp = view.model(request.model).tp
        gpus = free_gpu_group(view, tp)
        if gpus is None:
            off = [n for n in view.nodes() if n.power is NodePower.OFF]
            if not off:
                return Drop("full")
            gpus = tuple(off[0].gpus[:tp])
        return StartInstance(request.model, gpus)

    def scale(self, view: ClusterView) -> Plan:
        return Plan(tuple(StopInstance(i.id) for i in view.instances()
                          if i.phase is InstancePhase.READY and not i.running and not i.waiting
                          and view.now_s - i.last_busy_s > 10))

    def consolidate(self, view: ClusterView) -> Plan:
        return Plan(tuple(PowerOff(n.id) for n in view.nodes()
                          if n.power is NodePower.ON and all(not view.gpu(g).instances for g in n.gpus)))


def test_nodes_power_off_and_wake_without_serving_while_off() -> None:
    requests = poisson_requests(200, 0.05, seed=3)  # sparse: instances stop and nodes power off between requests
    result = simulate(PowerCyclingPolicy(PolicyContext(STORE, GPU)), requests, nodes=2, gpus_per_node=2)
    assert result.requests_completed == 200 and result.invalid_decisions == 0
    assert result.node_hours_powered < 2 * result.sim_time_s / 3600  # nodes were off part of the time
    assert result.cold_starts > 3


def test_a_decision_that_does_not_fit_is_refused_and_counted() -> None:
    class Overpacking(PowerCyclingPolicy):
        name = "test-overpacking"

        def place(self, request: Request, view: ClusterView) -> Placement:
            return StartInstance(request.model, (0,) * view.model(request.model).tp, memory_fraction=0.05)

    result = simulate(Overpacking(PolicyContext(STORE, GPU)), poisson_requests(5, 1.0, seed=2))
    assert result.requests_dropped == 5 and result.invalid_decisions == 5


class Spy(PowerCyclingPolicy):
    """Keeps what the simulator hands it: each arrival, and each outcome with the time it was told."""

    name = "test-spy"

    def __init__(self, context: PolicyContext):
        super().__init__(context)
        self.arrivals: list[Arrival] = []
        self.told: list[tuple[float, EndedRequest]] = []
        self.view: Simulation | None = None

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        self.arrivals.append(request)
        return super().place(request, view)

    def feedback(self, done: Sequence[EndedRequest]) -> None:
        assert self.view is not None
        self.told.extend((self.view.now_s, outcome) for outcome in done)


def test_the_policy_never_sees_an_output_length_at_arrival_and_is_told_each_requests_end() -> None:
    """Two GPUs for three models: some requests are served, others refused. place() gets arrivals
    without an output length; feedback() gets every request once, when it ended: a served one
    with its true output length and latencies at its finish time, a refused one at its arrival."""
    requests = poisson_requests(150, 4.0, seed=5)
    spy = Spy(PolicyContext(STORE, GPU))
    sim = CheckedSimulation(ClusterConfig(nodes=1, gpus_per_node=2), STORE, spy, requests,
                            slos({r.model for r in requests}))
    spy.view = sim
    result = sim.run()
    assert len(spy.arrivals) == len(requests)
    assert all(type(a) is Arrival and not hasattr(a, "output_tokens") for a in spy.arrivals)
    assert [(a.model, a.prompt_tokens) for a in spy.arrivals] == [(r.model, r.prompt_tokens) for r in requests]

    served = [rec for rec in sim.records if not rec.dropped]
    refused = [rec for rec in sim.records if rec.dropped]
    assert served and refused and len(served) == result.requests_completed
    assert Counter((o.model, o.prompt_tokens, o.output_tokens, round(now_s, 9), round(o.ttft_s or -1, 9))
                   for now_s, o in spy.told if o.ended is Ending.COMPLETED) == Counter(
        (rec.request.model, rec.request.prompt_tokens, rec.request.output_tokens, round(rec.finish_s, 9),
         round(rec.first_token_s - rec.request.arrival_s, 9)) for rec in served)
    assert Counter((o.model, o.prompt_tokens, o.output_tokens, round(now_s, 9)) for now_s, o in spy.told
                   if o.ended is Ending.REFUSED) == Counter(
        (rec.request.model, rec.request.prompt_tokens, 0, round(rec.request.arrival_s, 9)) for rec in refused)
    for _, o in spy.told:
        if o.ended is Ending.COMPLETED:
            assert o.ttft_s is not None and o.ttft_s > 0
            assert (o.tbt_s is None) == (o.output_tokens == 1) and (o.tbt_s is None or o.tbt_s > 0)
        else:
            assert o.ttft_s is None and o.tbt_s is None
