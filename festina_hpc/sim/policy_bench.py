"""The policy decision-cost benchmark behind ``festina bench policy``: what one decision costs as the cluster grows.

For each cluster size (8-GPU H100 nodes) a ``Simulation`` with no requests is
populated as a busy serving cluster: nodes cycle through three layouts
(``NODE_LAYOUTS``) of the eight shipped models of ``DEFAULT_MODEL_MIX``, about
one instance per 1.4 GPUs, small models co-located two to a GPU at partial SM
shares and memory fractions, 34B and 70B models on 2 and 4 GPUs, and two empty
GPUs in every third node. Every instance is made ready through the simulator's
own ``_start``/``_instance_ready``, then given a seeded load: sequences
decoding (up to its KV room), a queue (empty for most, a few short, 5% a burst
of 16-128 requests, so placement must step around unsafe instances) and an
arrival rate. Three costs are measured on that state, with
``time.perf_counter_ns`` around the policy call alone:

- **placement**: ``decisions`` calls of ``place()`` for requests spread
  uniformly over the models. Decisions are carried out so loads move as they
  would: a route queues the request there, a start adds a ready instance and
  queues the request on it; after each decision one request in flight
  finishes (the state's own in a seeded random order, then the placed ones
  oldest first) and its instance admits one waiting request, so the number in
  flight stays constant while load shifts to where placement puts it. Decisions per second is calls over the summed call
  time; p50 and p99 are per call.
- **local control**: one ``control(gpu, view)`` per GPU holding an instance,
  at the largest size only (the call reads one GPU, so its cost does not depend
  on the cluster's size), right after the placement pass, with the policy's
  memo as that pass left it; reported as the mean milliseconds per call.
- **consolidation**: one ``consolidate(view)`` call on the state the placement
  pass left, at each size, in seconds.

The built state is frozen out of the garbage collector's full passes while it is
timed (``gc.freeze``): such a pass over the simulator's records takes tens to
hundreds of milliseconds at 8,192 GPUs and would land on whichever call
triggered it. The policy's own allocations still trigger the young passes,
which are timed.
"""

from __future__ import annotations

import gc
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.cluster.rate import RateMeter
from festina_hpc.cluster.slo import default_slo
from festina_hpc.policy.base import Policy, PolicyContext, make_policy
from festina_hpc.policy.types import Drop, InstancePhase, Plan, Request, Route, StartInstance
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.sim.cluster import RequestRecord, SimInstance
from festina_hpc.sim.simulator import InvalidDecision, Simulation
from festina_hpc.sim.workload import DEFAULT_MODEL_MIX

GPU_TYPE = "h100-sxm-80gb"
GPUS_PER_NODE = 8
PROMPT_TOKENS = (128, 2048)  # uniform range of the benchmark's prompts
OUTPUT_TOKENS = (16, 512)  # and of their outputs
KV_FILL = 0.8  # decoding sequences take at most this share of an instance's KV room


@dataclass(frozen=True)
class Slot:
    """One instance of a node layout: the model, its GPUs within the node, its SM share and memory fraction."""

    model: str
    gpus: tuple[int, ...]
    sm_pct: float = 100.0
    memory_fraction: float = 1.0


# Node i takes layout i % 3: small models packed two to a GPU, a 70B with mid-size models, and a
# 70B with two spare GPUs (new instances and evacuations have somewhere to go).
NODE_LAYOUTS: tuple[tuple[Slot, ...], ...] = (
    (Slot("llama-3.1-8b", (0,), 50, 0.5), Slot("mistral-7b", (0,), 50, 0.5), Slot("llama-2-13b", (1,)),
     Slot("mistral-nemo-12b", (2,), 60, 0.55), Slot("llama-2-7b", (2,), 40, 0.45), Slot("llama-3.1-8b", (3,)),
     Slot("codellama-34b", (4, 5)), Slot("mistral-7b", (6,)), Slot("llama-2-7b", (7,), 50, 0.5)),
    (Slot("llama-3.1-70b", (0, 1, 2, 3)), Slot("codellama-34b", (4, 5), 70, 0.7), Slot("llama-2-13b", (6,)),
     Slot("llama-3.1-8b", (7,), 50, 0.5), Slot("mistral-nemo-12b", (7,), 50, 0.5)),
    (Slot("llama-2-70b", (0, 1, 2, 3)), Slot("mistral-nemo-12b", (4,)), Slot("llama-3.1-8b", (5,))),
)


@dataclass
class SizeFigures:
    """Everything measured at one cluster size (``as_json`` keeps the published keys)."""

    gpus: int
    instances: int = 0  # after the build
    build_s: float = 0.0
    decisions: int = 0
    place_ns: list[int] = field(default_factory=list, repr=False)
    outcomes: Counter[str] = field(default_factory=Counter)  # route / start / drop / invalid start
    plan_s: float = math.nan
    plan_actions: int = 0

    @property
    def decisions_per_s(self) -> float:
        total = sum(self.place_ns)
        return len(self.place_ns) / (total / 1e9) if total else math.inf

    @property
    def p50_us(self) -> float:
        return float(np.percentile(self.place_ns, 50)) / 1e3

    @property
    def p99_us(self) -> float:
        return float(np.percentile(self.place_ns, 99)) / 1e3

    @property
    def max_us(self) -> float:
        return max(self.place_ns) / 1e3


@dataclass
class PolicyBench:
    """The benchmark's result: one ``SizeFigures`` per size and the control tick at the largest."""

    policy: str
    sizes: list[SizeFigures]
    control_gpus: int = 0  # GPUs whose control() was timed
    control_ns: list[int] = field(default_factory=list, repr=False)

    @property
    def control_tick_ms(self) -> float:
        return float(np.mean(self.control_ns)) / 1e6 if self.control_ns else math.nan

    @property
    def control_tick_p99_ms(self) -> float:
        return float(np.percentile(self.control_ns, 99)) / 1e6 if self.control_ns else math.nan

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "placement": [{"gpus": s.gpus, "decisions_per_s": s.decisions_per_s, "p50_us": s.p50_us,
                           "p99_us": s.p99_us} for s in self.sizes],
            "control_tick_ms": self.control_tick_ms,
            "consolidate": [{"gpus": s.gpus, "plan_s": s.plan_s} for s in self.sizes],
        }


# -- the cluster state ----------------------------------------------------------------------------------


class _Ids:
    """Request ids for the benchmark's synthetic requests (one counter per run, no globals)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def _request(rng: np.random.Generator, ids: _Ids, model: str) -> Request:
    return Request(ids.take(), 0.0, model, int(rng.integers(*PROMPT_TOKENS, endpoint=True)),
                   int(rng.integers(*OUTPUT_TOKENS, endpoint=True)))


def add_decoding(inst: SimInstance, requests: Sequence[Request]) -> None:
    """Admit ``requests`` straight into the instance's decode batch, reserving their KV room."""
    records = [RequestRecord(r) for r in requests]
    inst.kv_tokens_reserved += sum(r.prompt_tokens + r.output_tokens for r in requests)
    inst.start_decoding(records, 0.0)


def add_waiting(inst: SimInstance, requests: Sequence[Request]) -> None:
    """Queue ``requests`` at the instance (not admitted)."""
    inst.queue.extend(RequestRecord(r) for r in requests)


def build_state(store: ProfileStore, policy: Policy, gpus: int, rng: np.random.Generator,
                ids: _Ids | None = None) -> Simulation:
    """A ``Simulation`` of ``gpus`` GPUs (a multiple of 8) populated and loaded as described above."""
    if gpus <= 0 or gpus % GPUS_PER_NODE:
        raise ValueError(f"gpus must be a positive multiple of {GPUS_PER_NODE}, got {gpus}")
    ids = ids or _Ids()
    slos = {m: default_slo(store, GPU_TYPE, m) for m in DEFAULT_MODEL_MIX}
    sim = Simulation(ClusterConfig(nodes=gpus // GPUS_PER_NODE, gpus_per_node=GPUS_PER_NODE, gpu_type=GPU_TYPE),
                     store, policy, [], slos)
    mean_need = (sum(PROMPT_TOKENS) + sum(OUTPUT_TOKENS)) / 2
    for node in range(gpus // GPUS_PER_NODE):
        base = node * GPUS_PER_NODE
        for slot in NODE_LAYOUTS[node % len(NODE_LAYOUTS)]:
            inst, _ = sim._start(StartInstance(slot.model, tuple(base + g for g in slot.gpus), sm_pct=slot.sm_pct,
                                               memory_fraction=slot.memory_fraction))
            sim._instance_ready(inst)
            room = int(KV_FILL * inst.kv_capacity_tokens / mean_need)
            running = min(room, inst.batch_cap, int(rng.integers(0, 49)))
            add_decoding(inst, [_request(rng, ids, inst.model) for _ in range(running)])
            u = rng.random()
            waiting = 0 if u < 0.8 else int(rng.integers(1, 5)) if u < 0.95 else int(rng.integers(16, 129))
            add_waiting(inst, [_request(rng, ids, inst.model) for _ in range(waiting)])
            inst._rate = RateMeter(inst.started_s, float(rng.uniform(0.1, 4.0)))  # requests/s routed to it lately
    return sim


# -- the measurements -----------------------------------------------------------------------------------


def _finish_oldest(sim: Simulation, in_flight: deque[int]) -> None:
    """The request at the front of ``in_flight`` finishes; its instance admits one waiting request in its place.

    An instance with nothing decoding serves its oldest waiting request instead.
    """
    while in_flight:
        inst = sim.live.get(in_flight.popleft())
        if inst is None or not inst.holds_work:
            continue
        if not inst.decoding:
            if inst.queue:
                inst.queue.popleft()
            return
        inst.advance(inst.steps_to_next_finish(), sim.now_s)
        if inst.queue and inst.running < inst.batch_cap:
            add_decoding(inst, [inst.queue.popleft().request])
        return


def time_placement(sim: Simulation, policy: Policy, decisions: int, rng: np.random.Generator, ids: _Ids,
                   figures: SizeFigures) -> None:
    """``decisions`` timed ``place()`` calls, each decision carried out (see the module docstring)."""
    owners = [inst.id for inst in sim.instances() for _ in range(inst.running + inst.waiting)]
    rng.shuffle(owners)  # the order in which the state's requests finish
    in_flight = deque(owners)
    models = list(DEFAULT_MODEL_MIX)
    clock = time.perf_counter_ns
    for _ in range(decisions):
        request = _request(rng, ids, models[int(rng.integers(len(models)))])
        arrival = request.arrival()
        start = clock()
        decision = policy.place(arrival, sim)
        figures.place_ns.append(clock() - start)
        if isinstance(decision, StartInstance):
            try:
                inst, _ = sim._start(decision)
            except InvalidDecision:
                figures.outcomes["invalid start"] += 1
                continue
            sim._instance_ready(inst)
            decision = Route(inst.id)
            figures.outcomes["start"] += 1
        elif isinstance(decision, Route):
            figures.outcomes["route"] += 1
        if isinstance(decision, Drop):
            figures.outcomes["drop"] += 1
            continue
        target = sim.live.get(decision.instance_id)
        if target is None or target.phase > InstancePhase.READY:
            figures.outcomes["invalid route"] += 1
            continue
        add_waiting(target, [request])
        in_flight.append(target.id)
        _finish_oldest(sim, in_flight)
    figures.decisions = decisions


def time_control(sim: Simulation, policy: Policy) -> list[int]:
    """Nanoseconds of one ``control()`` call per GPU holding an instance (settings are not applied)."""
    clock = time.perf_counter_ns
    spent = []
    for gpu in sim.gpus():
        if not gpu.instances:
            continue
        start = clock()
        policy.control(gpu, sim)
        spent.append(clock() - start)
    return spent


def time_consolidate(sim: Simulation, policy: Policy) -> tuple[float, Plan]:
    start = time.perf_counter_ns()
    plan = policy.consolidate(sim)
    return (time.perf_counter_ns() - start) / 1e9, plan


def run_policy_bench(store: ProfileStore, policy_name: str, gpu_counts: Sequence[int], decisions: int,
                     seed: int = 0, context: PolicyContext | None = None) -> PolicyBench:
    """Build each size's state with a fresh policy and time placement and consolidation there;
    time local control at the largest size."""
    context = context or PolicyContext(store, GPU_TYPE)
    result = PolicyBench(policy_name, [])
    largest = max(gpu_counts)
    for gpus in gpu_counts:
        rng = np.random.default_rng([seed, gpus])
        ids = _Ids()
        policy = make_policy(policy_name, context)
        figures = SizeFigures(gpus)
        start = time.perf_counter()
        sim = build_state(store, policy, gpus, rng, ids)
        figures.build_s = time.perf_counter() - start
        figures.instances = len(sim.live)
        # The built state lives through the timing; the collector's full passes over it (tens to
        # hundreds of ms at 8,192 GPUs, mostly the simulator's own records) are not the policy's cost.
        gc.collect()
        gc.freeze()
        try:
            time_placement(sim, policy, decisions, rng, ids, figures)
            if gpus == largest and not result.control_ns:
                result.control_ns = time_control(sim, policy)
                result.control_gpus = len(result.control_ns)
            figures.plan_s, plan = time_consolidate(sim, policy)
        finally:
            gc.unfreeze()
        figures.plan_actions = len(plan.actions)
        result.sizes.append(figures)
    return result
