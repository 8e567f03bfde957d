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
prefill within the TTFT SLO, or its predicted time between tokens with
one more sequence would exceed 80% of the TBT SLO (the planning headroom every
policy shares, ``policy.common.TTFT_PLANNING`` and ``TBT_PLANNING``). Instances are
never stopped (no scale to zero), as in a static deployment, which also
deploys one instance of every model up front (the simulation's warm-up lets
them load before the trace starts). ``vllm-autoscale`` (below) is the same
deployment behind an autoscaler that also scales in.
"""

from __future__ import annotations

from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import free_gpu_group, idle_for_s, place_on_whole_gpus, serving
from festina_hpc.policy.types import (
    Arrival,
    ClusterView,
    Placement,
    Plan,
    StartInstance,
    StopInstance,
)


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

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        return place_on_whole_gpus(self.store, view, request, self.gpu_spec.max_clock_mhz)


@register
class VllmAutoscalePolicy(VllmPolicy):
    """``vllm-autoscale``: the ``vllm`` deployment behind a load autoscaler that also scales in.

    The mechanism is a Kubernetes/KServe autoscaler (the Knative pod autoscaler) in front of vLLM
    replicas: scale-out on load is vllm's own (a new dedicated instance when none looked at has room),
    and a replica idle for the scale-down window (``PolicyContext.keep_alive_s``; Knative's stable
    window defaults to 60 s) is stopped, down to ``minReplicas: 1`` per model (KServe's default),
    so a model always has a warm instance and never cold-starts from zero. Scale-in stops the
    idle replicas and keeps the most recently busy one when every replica of the model is idle.
    """

    name = "vllm-autoscale"
    scale_period_s = 1.0  # the scale-down window is checked at this resolution

    def scale(self, view: ClusterView) -> Plan:
        deploy = super().scale(view)
        now_s, keep_alive_s = view.now_s, self.context.keep_alive_s
        stops: list[StopInstance] = []
        for model in view.models():
            live = serving(view.instances_of(model.name))
            idle = [i for i in live if idle_for_s(i, now_s) > keep_alive_s]
            keep = 1 if len(idle) == len(live) else 0  # minReplicas: 1
            stops += [StopInstance(i.id) for i in sorted(idle, key=lambda i: -i.last_busy_s)[keep:]]
        if not stops:
            return deploy
        return Plan(deploy.actions + tuple(stops), "deploy every model; scale in idle replicas")
