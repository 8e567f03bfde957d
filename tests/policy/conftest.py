"""Builders for policy tests: shipped H100 profiles, SLOs, seeded Poisson workloads, a simulator and a fake view.

Workloads are synthetic and small (a few hundred requests) so every test runs
the real simulator in well under a second; the fake view is for unit tests
of one policy step on a hand-built cluster state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.config import default_profiles_dir
from festina_hpc.policy.base import Policy, PolicyContext, make_policy
from festina_hpc.policy.types import InstancePhase, ModelInfo, NodePower, Request, Slo
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.simulator import SimResult, Simulation

GPU = "h100-sxm-80gb"
STORE = ProfileStore(default_profiles_dir())
MODELS = ("llama-3.1-8b", "mistral-7b", "llama-2-13b")
POLICIES = ("vllm", "vllm-autoscale", "serverlessllm", "muxserve", "llumnix", "dynamollm")


def make_slo(model: str, scale: float = 5.0) -> Slo:
    """``scale`` times the profile's batch-1 latencies at max clock (prefill and decode of 1024 tokens)."""
    return Slo(ttft_s=scale * STORE.predict(GPU, model, "prefill", 1, 1024).latency_s,
               tbt_s=scale * STORE.predict(GPU, model, "decode", 1, 1024).latency_s)


def slos_for(models: Iterable[str]) -> dict[str, Slo]:
    return {m: make_slo(m) for m in models}


def poisson_requests(rng: np.random.Generator, rates_per_s: Mapping[str, float], duration_s: float,
                     start_s: float = 0.0, prompt_tokens: tuple[int, int] = (128, 1024),
                     output_tokens: tuple[int, int] = (16, 256), first_id: int = 0) -> list[Request]:
    """Poisson arrivals per model over ``[start_s, start_s + duration_s)``, lengths uniform in the ranges."""
    arrivals: list[tuple[float, str]] = []
    for model, rate in rates_per_s.items():
        t = start_s
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= start_s + duration_s:
                break
            arrivals.append((t, model))
    arrivals.sort()
    return [Request(first_id + i, t, model, int(rng.integers(*prompt_tokens, endpoint=True)),
                    int(rng.integers(*output_tokens, endpoint=True)))
            for i, (t, model) in enumerate(arrivals)]


def bursts(rng: np.random.Generator, rates_per_s: Mapping[str, float], burst_s: float, gap_s: float,
           count: int) -> list[Request]:
    """``count`` Poisson bursts of ``burst_s`` seconds, each followed by ``gap_s`` seconds of silence."""
    requests: list[Request] = []
    for k in range(count):
        requests += poisson_requests(rng, rates_per_s, burst_s, start_s=k * (burst_s + gap_s),
                                     first_id=len(requests))
    return requests


def simulation(policy: str | Policy, requests: Sequence[Request], *, keep_alive_s: float = 60.0,
               models: Iterable[str] = (), live_share_change: bool = False, **config: object) -> Simulation:
    if isinstance(policy, str):
        policy = make_policy(policy, PolicyContext(STORE, GPU, keep_alive_s=keep_alive_s,
                                                   live_share_change=live_share_change))
    cluster = ClusterConfig(**{"nodes": 1, "gpus_per_node": 8, **config})  # type: ignore[arg-type]
    return Simulation(cluster, STORE, policy, requests, slos_for({r.model for r in requests} | set(models)),
                      live_share_change=live_share_change)


def simulate(policy: str | Policy, requests: Sequence[Request], **kwargs: object) -> SimResult:
    return simulation(policy, requests, **kwargs).run()  # type: ignore[arg-type]


# -- a fake cluster view for unit tests of one policy step -------------------------------------------


@dataclass
class FakeInstance:
    id: int
    model: str
    gpus: tuple[int, ...]
    node: int = 0
    phase: InstancePhase = InstancePhase.READY
    sm_pct: float = 100.0
    batch_cap: int = 256
    memory_fraction: float = 1.0
    running: int = 0
    waiting: int = 0
    prompt_tokens_each: int = 1024  # the queue's prompts, for pending_prompt_tokens
    chunk_tokens: int = 2048
    kv_tokens_reserved: int = 0
    kv_capacity_tokens: int = 200_000
    ready_at_s: float = 0.0
    last_busy_s: float = 0.0
    arrival_rate_per_s: float = 0.0

    @property
    def pending_prompt_tokens(self) -> int:
        return self.waiting * self.prompt_tokens_each


@dataclass
class FakeGpu:
    id: int
    node: int
    clock_mhz: int = 1980
    instances: list[int] = field(default_factory=list)
    sm_pct_allocated: float = 0.0
    memory_fraction_allocated: float = 0.0


@dataclass
class FakeNode:
    id: int
    gpus: tuple[int, ...]
    cached: set[str] = field(default_factory=set)
    power: NodePower = NodePower.ON
    ready_at_s: float = 0.0

    def has_cached(self, model: str) -> bool:
        return model in self.cached


class FakeView:
    """A ``ClusterView`` over hand-placed instances; ``add`` keeps GPU allocations consistent."""

    def __init__(self, nodes: int = 1, gpus_per_node: int = 8, now_s: float = 0.0,
                 models: Iterable[str] = MODELS, model_rates: Mapping[str, float] | None = None,
                 slos: Mapping[str, Slo] | None = None):
        self.now_s = now_s
        self.gpu_type = GPU
        self._gpus = [FakeGpu(g, g // gpus_per_node) for g in range(nodes * gpus_per_node)]
        self._nodes = [FakeNode(n, tuple(range(n * gpus_per_node, (n + 1) * gpus_per_node))) for n in range(nodes)]
        self._models: dict[str, ModelInfo] = {}
        for name in models:
            slo = slos[name] if slos is not None else make_slo(name)
            self._models[name] = ModelInfo.on_gpu(STORE.model(name), GPU, slo)
        self._instances: dict[int, FakeInstance] = {}
        self.model_rates = dict(model_rates or {})

    def add(self, inst: FakeInstance) -> FakeInstance:
        inst.node = self._gpus[inst.gpus[0]].node
        self._instances[inst.id] = inst
        for g in inst.gpus:
            gpu = self._gpus[g]
            gpu.instances.append(inst.id)
            gpu.sm_pct_allocated += inst.sm_pct
            gpu.memory_fraction_allocated += inst.memory_fraction
        return inst

    def remove(self, instance_id: int) -> None:
        inst = self._instances.pop(instance_id)
        for g in inst.gpus:
            gpu = self._gpus[g]
            gpu.instances.remove(instance_id)
            gpu.sm_pct_allocated -= inst.sm_pct
            gpu.memory_fraction_allocated -= inst.memory_fraction

    def model(self, name: str) -> ModelInfo:
        return self._models[name]

    def models(self) -> Iterable[ModelInfo]:
        return self._models.values()

    def instance(self, instance_id: int) -> FakeInstance:
        return self._instances[instance_id]

    def instances(self) -> Iterable[FakeInstance]:
        return list(self._instances.values())

    def instances_of(self, model: str) -> Sequence[FakeInstance]:
        return [i for i in self._instances.values() if i.model == model]

    def gpu(self, gpu_id: int) -> FakeGpu:
        return self._gpus[gpu_id]

    def gpus(self) -> Sequence[FakeGpu]:
        return self._gpus

    def node(self, node_id: int) -> FakeNode:
        return self._nodes[node_id]

    def nodes(self) -> Sequence[FakeNode]:
        return self._nodes

    def free_gpus(self) -> Sequence[int]:
        return [g.id for g in self._gpus if not g.instances]

    def model_rate_per_s(self, model: str) -> float:
        return self.model_rates.get(model, 0.0)


def make_policy_for(name: str, keep_alive_s: float = 60.0, live_share_change: bool = False) -> Policy:
    return make_policy(name, PolicyContext(STORE, GPU, keep_alive_s=keep_alive_s, live_share_change=live_share_change))


def request(model: str = "llama-3.1-8b", prompt_tokens: int = 512, output_tokens: int = 128, rid: int = 0,
            arrival_s: float = 0.0) -> Request:
    return Request(rid, arrival_s, model, prompt_tokens, output_tokens)


def used_gpus(sim: Simulation) -> set[int]:
    return {g.id for g in sim.gpus() if g.instances}

