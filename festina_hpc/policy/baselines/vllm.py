"""``vllm``: dedicated whole GPUs per model instance at max clock, load-aware routing, always warm.

What is kept of vLLM (Kwon et al., SOSP'23) as deployed behind a router: every
instance owns whole GPUs (tensor parallelism within a node), runs at the
default (max) clock, and continuous batching is the simulator's. The router
sends a request to the less loaded of two sampled ready instances of its
model (power of two choices), or to the newest instance when neither has
room. At its best (the evaluation method asks for it) it scales out to as
many dedicated instances as it needs to meet SLOs: a new instance starts when
no instance looked at has room, that is when its KV cache cannot hold its
queue and the request, its queued prompts and the request's would not
prefill within 80% of the TTFT SLO, or its predicted time between tokens with
one more sequence would exceed 80% of the TBT SLO. Instances are
never stopped (no scale to zero), as in a static deployment, which also
deploys one instance of every model up front (the simulation's warm-up lets
them load before the trace starts).
"""

from __future__ import annotations

from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import (
    free_gpu_group,
    least_loaded,
    predicted_tbt_s,
    prefill_time_s,
    sampled,
    serving,
)
from festina_hpc.policy.types import (
    ClusterView,
    Drop,
    InstancePhase,
    InstanceView,
    Placement,
    Plan,
    Request,
    Route,
    StartInstance,
)

EXPECTED_OUTPUT_TOKENS = 512  # KV room a router sets aside per request (a typical max_tokens)
SLO_HEADROOM = 0.8  # an instance is full when one more sequence would take its TBT past this share of the SLO


def route_with_room(policy: Policy, request: Request, view: ClusterView,
                    candidates: list[InstanceView]) -> InstanceView | None:
    """A serving instance of the request's model with room for it, looking at O(1) instances."""
    limit_s = SLO_HEADROOM * view.model(request.model).slo.tbt_s
    clock = policy.gpu_spec.max_clock_mhz

    need = request.prompt_tokens + EXPECTED_OUTPUT_TOKENS  # a router does not know the output length

    ttft_limit_s = SLO_HEADROOM * view.model(request.model).slo.ttft_for(request.prompt_tokens)

    def has_room(inst: InstanceView) -> bool:
        # KV room for the queue and this request (each queued one taken as this one's size), the
        # queued prompts and this one prefilled within the TTFT SLO's headroom, and a TBT that stays
        # within the SLO's headroom with one more sequence.
        if inst.kv_tokens_reserved + (inst.waiting + 1) * need > inst.kv_capacity_tokens:
            return False
        if inst.phase is InstancePhase.READY:  # a loading instance's queue waits for the load either way
            prefill_s = prefill_time_s(policy.store, view.gpu_type, inst.model,
                                       inst.pending_prompt_tokens + request.prompt_tokens, inst.sm_pct, clock)
            if prefill_s > ttft_limit_s:
                return False
        return predicted_tbt_s(policy.store, view.gpu_type, inst, clock) <= limit_s

    ready = [i for i in candidates if i.phase is InstancePhase.READY]
    best = least_loaded(i for i in sampled(ready, request.id) if has_room(i))
    if best is not None:
        return best
    if candidates and has_room(candidates[-1]):
        return candidates[-1]  # the newest instance, possibly still loading
    return None


@register
class VllmPolicy(Policy):
    name = "vllm"

    def __init__(self, context: PolicyContext):
        super().__init__(context)
        self._deployed: set[str] = set()

    def scale(self, view: ClusterView) -> Plan:
        """Deploy every model once, up front; later instances start on demand in place()."""
        actions: list[StartInstance] = []
        taken: set[int] = set()
        for model in sorted(view.models(), key=lambda m: -m.tp):  # the widest first, while nodes are empty
            if model.name in self._deployed:
                continue
            gpus = free_gpu_group(view, model.tp, exclude=taken)
            if gpus is None:
                continue
            self._deployed.add(model.name)
            taken.update(gpus)
            actions.append(StartInstance(model.name, gpus))
        return Plan(tuple(actions), "deploy every model")

    def place(self, request: Request, view: ClusterView) -> Placement:
        candidates = serving(view.instances_of(request.model))
        target = route_with_room(self, request, view, candidates)
        if target is not None:
            return Route(target.id)
        gpus = free_gpu_group(view, view.model(request.model).tp)
        if gpus is not None:
            return StartInstance(request.model, gpus)
        fallback = least_loaded(candidates)
        if fallback is not None:
            return Route(fallback.id)
        return Drop("no GPU free for a new instance")
