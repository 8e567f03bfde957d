"""An operator's per-model bounds (``ModelLimits``, from the catalogue) applied to any policy's decisions.

Policies decide as if models had no bounds; a driver (festinad, the simulator) passes each decision
through here before carrying it out, so every policy honours the catalogue the same way and none
needs to know of it:

- ``limit_placement``: a ``StartInstance`` that would exceed ``max_instances`` (or evict an instance
  that ``min_instances`` keeps) routes to the model's least-loaded serving instance instead, or is a
  ``Drop`` with the reason when it has none;
- ``limit_plan``: the same for a plan's starts, and a ``StopInstance`` that would take a model below
  ``min_instances``, or to zero before it has been idle its ``keep_alive_s``, is refused;
- ``upkeep``: the actions the bounds themselves call for: starts for a model below
  ``min_instances`` (on free GPUs), stops for a model idle past its own ``keep_alive_s`` (down to
  ``min_instances``), whatever the policy's own keep-alive.

Migrations pass: they move an instance, the count stays. Refusals come back as data with their reason
(``Refusal``) for the driver to record. All functions are pure over the ``ClusterView``; with no model
bounded they return their input unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from festina_hpc.policy.common import free_gpu_group, serving
from festina_hpc.policy.types import (
    NO_LIMITS,
    Action,
    ClusterView,
    Drop,
    InstancePhase,
    InstanceView,
    Placement,
    Plan,
    Route,
    StartInstance,
    StopInstance,
)


@dataclass(frozen=True)
class Refusal:
    """A decision the bounds refused, and why (for the audit trail)."""

    decision: Action | Placement  # what the policy asked for
    reason: str  # e.g. "llama-3.1-8b: max_instances = 2 reached"


@dataclass(frozen=True)
class Limited:
    """A plan after the bounds: what may be carried out, and what was refused."""

    plan: Plan
    refused: tuple[Refusal, ...] = ()


@dataclass(frozen=True)
class Upkeep:
    """What the bounds themselves call for: the plan, and bounds it could not meet (no room)."""

    plan: Plan
    unmet: tuple[str, ...] = ()  # e.g. "llama-3.1-8b: min_instances = 2, 1 serving, no free GPUs"


def bounded(view: ClusterView) -> bool:
    """Whether any model of the view has a bound (the fast path skips everything else when none has)."""
    return any(m.limits != NO_LIMITS for m in view.models())


def least_loaded(view: ClusterView, model: str) -> InstanceView | None:
    """The model's serving instance holding the fewest requests (ready before loading, then oldest)."""
    instances = serving(view.instances_of(model))
    if not instances:
        return None
    return min(instances, key=lambda i: (i.running + i.waiting, i.phase is not InstancePhase.READY))


def idle_s(view: ClusterView, model: str) -> float:
    """Seconds every serving instance of the model has been idle (ready, holding nothing); 0 when one is not."""
    instances = serving(view.instances_of(model))
    if not instances:
        return 0.0
    if any(i.phase is not InstancePhase.READY or i.running or i.waiting for i in instances):
        return 0.0
    return max(0.0, view.now_s - max(i.last_busy_s for i in instances))


class _Counts:
    """Serving instances per model as a plan is walked: what the cluster would hold after each action."""

    def __init__(self, view: ClusterView):
        self.view = view
        self._counts: dict[str, int] = {}

    def __getitem__(self, model: str) -> int:
        if model not in self._counts:
            self._counts[model] = len(serving(self.view.instances_of(model)))
        return self._counts[model]

    def add(self, model: str, delta: int) -> None:
        self._counts[model] = self[model] + delta


def _start_refusal(start: StartInstance, view: ClusterView, counts: _Counts) -> str | None:
    """Why the bounds refuse ``start`` given ``counts`` (updated when it is allowed), or None."""
    evicted: Counter[str] = Counter()
    for victim_id in start.evict:
        try:
            victim = view.instance(victim_id)
        except KeyError:
            continue  # the driver refuses an eviction of what is gone
        if victim.phase <= InstancePhase.READY:
            evicted[victim.model] += 1
    for model, n in evicted.items():
        keep = view.model(model).limits.min_instances
        if counts[model] - n < keep:
            return f"{model}: min_instances = {keep}: instance(s) {start.evict} may not be evicted"
    limit = view.model(start.model).limits.max_instances
    if limit is not None and counts[start.model] - evicted[start.model] >= limit:
        return f"{start.model}: max_instances = {limit} reached"
    for model, n in evicted.items():
        counts.add(model, -n)
    counts.add(start.model, 1)
    return None


def _stop_refusal(stop: StopInstance, view: ClusterView, counts: _Counts) -> str | None:
    try:
        inst = view.instance(stop.instance_id)
    except KeyError:
        return None  # gone already: the driver skips it
    if inst.phase > InstancePhase.READY:
        return None  # draining: already out of the count
    limits = view.model(inst.model).limits
    left = counts[inst.model] - 1
    if left < limits.min_instances:
        return f"{inst.model}: min_instances = {limits.min_instances} keeps instance {inst.id}"
    if left == 0 and limits.keep_alive_s is not None and idle_s(view, inst.model) < limits.keep_alive_s:
        return (f"{inst.model}: keep_alive_s = {limits.keep_alive_s:g} not reached "
                f"(idle {idle_s(view, inst.model):.0f} s): instance {inst.id} kept")
    counts.add(inst.model, -1)
    return None


def _instead(model: str, view: ClusterView, why: str) -> Placement:
    target = least_loaded(view, model)
    return Route(target.id) if target is not None else Drop(f"{why}, and no instance of {model} takes requests")


def limit_placement(placement: Placement, view: ClusterView) -> tuple[Placement, Refusal | None]:
    """``placement`` within the bounds: a start they refuse becomes a route to the model's least-loaded
    serving instance, or a ``Drop`` saying why; the ``Refusal`` says what was refused."""
    if not isinstance(placement, StartInstance):
        return placement, None
    if view.model(placement.model).limits == NO_LIMITS and not placement.evict:
        return placement, None
    why = _start_refusal(placement, view, _Counts(view))
    if why is None:
        return placement, None
    return _instead(placement.model, view, why), Refusal(placement, why)


def limit_plan(plan: Plan, view: ClusterView) -> Limited:
    """The plan's actions the bounds allow, in order, and the ones they refuse (each with its reason)."""
    if not plan or not bounded(view):
        return Limited(plan)
    counts = _Counts(view)
    kept: list[Action] = []
    refused: list[Refusal] = []
    for action in plan.actions:
        why = None
        if isinstance(action, StartInstance):
            why = _start_refusal(action, view, counts)
        elif isinstance(action, StopInstance):
            why = _stop_refusal(action, view, counts)
        if why is None:
            kept.append(action)
        else:
            refused.append(Refusal(action, why))
    if not refused:
        return Limited(plan)
    return Limited(Plan(tuple(kept), plan.reason), tuple(refused))


def upkeep(view: ClusterView) -> Upkeep:
    """Starts for models below ``min_instances`` (whole free GPUs, lowest first) and stops for models
    idle past their ``keep_alive_s`` (the newest instances, down to ``min_instances``)."""
    actions: list[Action] = []
    unmet: list[str] = []
    reasons: list[str] = []
    taken: set[int] = set()
    for model in view.models():
        limits = model.limits
        if limits == NO_LIMITS:
            continue
        instances = serving(view.instances_of(model.name))
        missing = limits.min_instances - len(instances)
        if missing > 0:
            reasons.append(f"{model.name}: min_instances = {limits.min_instances}")
            for started in range(missing):
                gpus = free_gpu_group(view, model.tp, exclude=taken)
                if gpus is None:
                    unmet.append(f"{model.name}: min_instances = {limits.min_instances}, "
                                 f"{len(instances) + started} serving or starting, "
                                 f"no {model.tp} free GPU(s) on one node")
                    break
                taken.update(gpus)
                actions.append(StartInstance(model.name, gpus))
            continue
        extra = len(instances) - limits.min_instances
        if limits.keep_alive_s is not None and extra > 0 and idle_s(view, model.name) >= limits.keep_alive_s:
            actions.extend(StopInstance(i.id) for i in instances[::-1][:extra])  # the newest first
            reasons.append(f"{model.name}: idle past keep_alive_s = {limits.keep_alive_s:g}")
    return Upkeep(Plan(tuple(actions), "catalogue limits: " + "; ".join(reasons) if reasons else ""),
                  tuple(unmet))
