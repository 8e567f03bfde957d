"""``vllm``: dedicated whole GPUs per model instance at max clock, load-aware routing, always warm.

What is kept of vLLM (Kwon et al., SOSP'23) as deployed behind a router: every
instance owns whole GPUs (tensor parallelism within a node), runs at the
default (max) clock, and continuous batching is the simulator's. Requests go
to the least-loaded instance of their model. At its best (the evaluation
method asks for it) it scales out to as many dedicated instances as it needs
to meet SLOs: a new instance starts when every instance's predicted time
between tokens with one more sequence would exceed 80% of the TBT SLO.
Instances are never stopped (no scale to zero), as in a static deployment.
"""

from __future__ import annotations

from festina_hpc.policy.base import Policy, register
from festina_hpc.policy.common import free_gpu_group, least_loaded, predicted_tbt_s, serving
from festina_hpc.policy.types import ClusterView, Drop, Placement, Request, Route, StartInstance

SLO_HEADROOM = 0.8  # an instance is full when one more sequence would take its TBT past this share of the SLO


@register
class VllmPolicy(Policy):
    name = "vllm"

    def place(self, request: Request, view: ClusterView) -> Placement:
        model = view.model(request.model)
        candidates = serving(view.instances_of(request.model))
        limit_s = SLO_HEADROOM * model.slo.tbt_s
        roomy = [i for i in candidates
                 if predicted_tbt_s(self.store, view.gpu_type, i, self.gpu_spec.max_clock_mhz) <= limit_s]
        best = least_loaded(roomy)
        if best is not None:
            return Route(best.id)
        gpus = free_gpu_group(view, model.tp)
        if gpus is not None:
            return StartInstance(request.model, gpus)
        fallback = least_loaded(candidates)
        if fallback is not None:
            return Route(fallback.id)
        return Drop("no GPU free for a new instance")
