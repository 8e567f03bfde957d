"""``serverlessllm``: scale to zero with fast, locality-aware cold starts on whole GPUs at max clock.

What is kept of ServerlessLLM (Fu et al., "ServerlessLLM: Low-Latency
Serverless Inference for Large Language Models", OSDI'24): instances own whole
GPUs at the default (max) clock and exist only while used: one idle longer
than the keep-alive (``PolicyContext.keep_alive_s``) is stopped, so a model
with no traffic holds no GPU. Checkpoints load with its fast multi-tier loader
(``fast_load``). Its startup-time-optimised scheduler is kept as locality: a
new instance goes to a node that holds the model in host memory (the fastest
tier short of a GPU) when one has free GPUs, else to any free GPUs. When no
GPU is free, idle instances of other models are evicted (least recently used
first, on the node where that frees enough GPUs) to make room, as a keep-alive
cache does on demand; only then is a node that power saving suspended resumed
(its resume takes minutes, an eviction costs a load). Routing is vLLM's, as
ServerlessLLM serves with vLLM: the least-loaded instance with room
(``has_room``, the shared planning headroom of ``policy.common``: its queued
prompts and this one prefill within the TTFT SLO, one more sequence keeps the
time between tokens within 80% of the TBT SLO); a new instance when all are full
(on free GPUs, else by evicting), else the least-loaded full one queues it.

Simplified: the scheduler's estimate of load time per server (queueing on each
tier's bandwidth) becomes the binary "cached on this node or not", which is
what the simulator's load model distinguishes; live migration of running
inferences to free a locality-advantaged server is not modelled (with
eviction of idle instances and a single SSD tier everywhere it would rarely
pay off). The simulator's ``StartInstance.evict`` carries the eviction out
atomically with the start.
"""

from __future__ import annotations

from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import free_gpu_group, idle_for_s, least_loaded, route_with_room, serving
from festina_hpc.policy.types import (
    Arrival,
    ClusterView,
    Drop,
    InstanceView,
    Placement,
    Plan,
    Route,
    StartInstance,
    StopInstance,
)


@register
class ServerlessLlmPolicy(Policy):
    name = "serverlessllm"
    fast_load = True
    scale_period_s = 1.0  # keep-alive expiry is checked at this resolution

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        # Eviction candidates seen by the last scale(): (model, instance id), least recently busy first.
        # place() re-checks each against the view, so a stale entry costs nothing.
        self._idle: list[tuple[str, int]] = []

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        model = view.model(request.model)
        candidates = serving(view.instances_of(request.model))
        best = route_with_room(self.store, view, request, candidates, self.gpu_spec.max_clock_mhz)
        if best is not None:
            return Route(best.id)
        free_nodes = {view.gpu(g).node for g in view.free_gpus()}
        cached = sorted(n for n in free_nodes if view.node(n).has_cached(request.model))
        gpus = free_gpu_group(view, model.tp, nodes_first=cached, wake=False)
        if gpus is not None:
            return StartInstance(request.model, gpus)
        start = self._evicting_start(request.model, model.tp, view)
        if start is not None:
            return start
        # Evicting an idle instance serves after a load; a suspended node only after its resume too.
        gpus = free_gpu_group(view, model.tp)
        if gpus is not None:
            return StartInstance(request.model, gpus)
        fallback = least_loaded(candidates)
        if fallback is not None:
            return Route(fallback.id)
        return Drop("no GPU free and no idle instance to evict")

    def _evicting_start(self, model: str, tp: int, view: ClusterView) -> StartInstance | None:
        """A start on GPUs freed by evicting idle instances of other models (LRU), or None."""
        free_by_node: dict[int, list[int]] = {}
        for g in view.free_gpus():
            free_by_node.setdefault(view.gpu(g).node, []).append(g)
        victims_by_node: dict[int, list[InstanceView]] = {}
        for victim_model, instance_id in self._idle:
            if victim_model == model:
                continue
            inst = next((i for i in view.instances_of(victim_model) if i.id == instance_id), None)
            if inst is not None and idle_for_s(inst, view.now_s) > 0:
                victims_by_node.setdefault(inst.node, []).append(inst)
        # Prefer nodes that cache the model, then the node needing the fewest evictions.
        plans: list[tuple[bool, int, int, StartInstance]] = []
        for node, victims in victims_by_node.items():
            gpus = list(free_by_node.get(node, []))
            evict: list[int] = []
            for inst in victims:
                if len(gpus) >= tp:
                    break
                gpus.extend(inst.gpus)
                evict.append(inst.id)
            if len(gpus) >= tp:
                plans.append((not view.node(node).has_cached(model), len(evict), node,
                              StartInstance(model, tuple(sorted(gpus)[:tp]), evict=tuple(evict))))
        if not plans:
            return None
        return min(plans, key=lambda p: p[:3])[3]

    def scale(self, view: ClusterView) -> Plan:
        now_s = view.now_s
        keep_alive_s = self.context.keep_alive_s
        stops: list[StopInstance] = []
        idle: list[tuple[float, str, int]] = []
        for inst in view.instances():
            idle_s = idle_for_s(inst, now_s)
            if idle_s > keep_alive_s:
                stops.append(StopInstance(inst.id))
            elif idle_s > 0:
                idle.append((inst.last_busy_s, inst.model, inst.id))
        self._idle = [(model, instance_id) for _, model, instance_id in sorted(idle)]
        return Plan(tuple(stops), reason="keep-alive expired" if stops else "")
