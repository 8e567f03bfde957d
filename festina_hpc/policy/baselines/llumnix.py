"""``llumnix``: load-aware dispatch by KV-cache freeness, request migration to rebalance, load-based autoscaling.

What is kept of Llumnix (Sun et al., "Llumnix: Dynamic Scheduling for Large
Language Model Serving", OSDI'24): instances own whole GPUs at the default
(max) clock, as vLLM instances. A request is dispatched to the instance with
the most "freeness": free KV-cache tokens after what its running sequences
hold and its queue will need (the queue's virtual usage), per sequence it
serves, among the instances that have room for it (``has_room``: the shared
planning headroom of ``policy.common``, 100% of the TTFT SLO for its queued
prompts and 80% of the TBT SLO with one more sequence). When none has, autoscaling starts another instance; an instance
idle longer than the keep-alive is scaled in, but never the model's last one.
Every ``consolidate_period_s`` (10 s) the rebalancer pairs each model's most
loaded instance (running + waiting) with its least loaded ready one and, when
the first has requests waiting and more than twice the load of the second,
moves half the difference of its queue across (``MoveQueued``); pairs are
taken until no such imbalance is left.

Simplified: Llumnix migrates running requests too, copying their KV cache
stage by stage while they decode; here only queued requests move (they hold
no KV, so the move is free), which is what rebalances a queue built up
behind a full or still loading instance. Priorities, de-fragmentation
migrations and its freeness-threshold autoscaler are reduced to the
SLO-based scale-out above.
"""

from __future__ import annotations

from collections.abc import Sequence

from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import (
    TokenStats,
    idle_for_s,
    place_on_whole_gpus,
    serving,
)
from festina_hpc.policy.types import (
    Action,
    Arrival,
    ClusterView,
    EndedRequest,
    InstancePhase,
    InstanceView,
    MoveQueued,
    Placement,
    Plan,
    StopInstance,
)

IMBALANCE_RATIO = 2.0  # migrate when the loaded instance holds more than this many times the other's load


@register
class LlumnixPolicy(Policy):
    name = "llumnix"
    consolidate_period_s = 10.0

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.stats = TokenStats()

    def freeness(self, inst: InstanceView) -> float:
        """Free KV tokens after the running sequences and the queue's virtual usage, per sequence served."""
        seq_tokens = self.stats.prompt_tokens(inst.model) + self.stats.output_tokens(inst.model)
        free = inst.kv_capacity_tokens - inst.kv_tokens_reserved - inst.waiting * seq_tokens
        return free / (inst.running + inst.waiting + 1)

    def feedback(self, done: Sequence[EndedRequest]) -> None:
        self.stats.learn(done)

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        self.stats.observe_prompt(request.model, request.prompt_tokens)
        return place_on_whole_gpus(self.store, view, request, self.gpu_spec.max_clock_mhz,
                                   prefer=lambda roomy: max(roomy, key=self.freeness, default=None))

    def scale(self, view: ClusterView) -> Plan:
        stops: list[StopInstance] = []
        for model in view.models():
            live = serving(view.instances_of(model.name))
            idle = [i for i in live if idle_for_s(i, view.now_s) > self.context.keep_alive_s]
            keep = len(live) - len(idle)
            for inst in sorted(idle, key=lambda i: -i.last_busy_s):
                if keep == 0:  # never scale a model to zero: the most recently busy idle instance stays
                    keep = 1
                    continue
                stops.append(StopInstance(inst.id))
        return Plan(tuple(stops), reason="scale in idle instances" if stops else "")

    def consolidate(self, view: ClusterView) -> Plan:
        moves: list[Action] = []
        for model in view.models():
            moves.extend(self._rebalance(serving(view.instances_of(model.name))))
        return Plan(tuple(moves), reason="migrate queued requests to balance load" if moves else "")

    def _rebalance(self, instances: list[InstanceView]) -> list[MoveQueued]:
        load = {i.id: i.running + i.waiting for i in instances}
        waiting = {i.id: i.waiting for i in instances}
        sources = sorted(instances, key=lambda i: -load[i.id])
        targets = sorted((i for i in instances if i.phase is InstancePhase.READY), key=lambda i: load[i.id])
        moves: list[MoveQueued] = []
        for src, dst in zip(sources, targets):
            if src.id == dst.id:
                break
            if waiting[src.id] == 0 or load[src.id] <= IMBALANCE_RATIO * load[dst.id]:
                break
            count = min(waiting[src.id], (load[src.id] - load[dst.id]) // 2)
            if count < 1:
                break
            moves.append(MoveQueued(src.id, dst.id, count))
            load[src.id] -= count
            load[dst.id] += count
        return moves
