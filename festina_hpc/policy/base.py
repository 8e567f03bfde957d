"""The policy interface and the registry that maps policy names to implementations.

A policy is four pure steps (STYLE: one small method per step of a decision):

- ``place(request, view)``: where an arriving request goes (``Route``,
  ``StartInstance`` or ``Drop``); called once per request, so it must not scan
  the cluster: use ``instances_of(model)`` and ``free_gpus()``.
- ``control(gpu, view)``: a GPU's clock, its instances' SM shares and batch
  caps (``GpuSettings``), called on control ticks for GPUs whose load changed.
- ``scale(view)``: instances to start or stop (keep-alive, scale to zero).
- ``consolidate(view)``: migrations and node power changes.

A policy sees an ``Arrival`` (no output length: that is the request's
future) and learns what happened from ``feedback(done)``: the driver reports
each request that ended, served, refused or failed, with its true token
counts and latencies, as vLLM's scheduler takes its step outputs.

Each returns data; the driver validates and carries it out. A policy keeps no
reference to the view between calls; it may keep its own bookkeeping (for
example a last-decision time per GPU for hysteresis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from festina_hpc.errors import FestinaError
from festina_hpc.policy.types import Arrival, ClusterView, EndedRequest, GpuSettings, GpuView, Placement, Plan
from festina_hpc.profiles.store import ProfileStore


class UnknownPolicyError(FestinaError):
    """No policy is registered under that name."""


@dataclass(frozen=True)
class PolicyContext:
    """What every policy is built with: the profiles and the cluster's GPU type."""

    store: ProfileStore
    gpu_type: str
    keep_alive_s: float = 60.0  # scale-to-zero policies stop an instance idle this long
    node_static_w: float = 1200.0  # non-GPU power of a powered node, for consolidation decisions
    resume_time_s: float = 300.0  # power-on to serving-ready of a node (Slurm's ResumeTimeout covers it)
    # Cold start of an instance: engine start plus weights per GPU over the load bandwidth (the
    # cluster's figures; these defaults are the standard loader of sim/workload.py).
    load_init_s: float = 10.0
    load_gbs: float = 2.5
    # Whether a running instance's SM share can change in place ([gpu] live_share_change); when
    # not, the driver carries out a share change in GpuSettings as a new instance at that share.
    live_share_change: bool = False
    # Per-model mean arrival rate over the whole workload, and mean (prompt, output) tokens, where
    # known in advance (the simulator's trace; MuxServe's offline placement assumes them). Empty in
    # the live system (festinad), where a policy measures rates as requests arrive.
    known_rates_per_s: Mapping[str, float] = field(default_factory=dict)
    known_lengths: Mapping[str, tuple[float, float]] = field(default_factory=dict)


class Policy(ABC):
    """Base class: implement ``place`` and override whichever other steps the policy needs."""

    name: ClassVar[str] = ""
    # Whether instances load with fast checkpoint loading (ServerlessLLM) or the standard loader.
    fast_load: ClassVar[bool] = False
    # Seconds between the driver's calls of scale() and consolidate().
    scale_period_s: ClassVar[float] = 5.0
    consolidate_period_s: ClassVar[float] = 60.0

    def __init__(self, context: PolicyContext):
        self.context = context
        self.store = context.store
        self.gpu_spec = context.store.gpu(context.gpu_type)

    @abstractmethod
    def place(self, request: Arrival, view: ClusterView) -> Placement:
        """Where ``request`` goes."""

    def feedback(self, done: Sequence[EndedRequest]) -> None:
        """Learn from requests that ended. Default: nothing.

        The contract: the driver calls it after requests end (completed, refused or failed), each
        request once, in the order they ended, before its next call of another step that should
        know of them; never with a request that is still running, so never with a request's
        future. The policy must not keep ``done``, and must not raise on an outcome it ignores.
        """
        return None  # a policy that plans from arrivals alone (vllm, serverlessllm) has nothing to learn

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        """Default: leave the GPU as it is (max clock, shares as started)."""
        return None

    def scale(self, view: ClusterView) -> Plan:
        return Plan()

    def consolidate(self, view: ClusterView) -> Plan:
        return Plan()


P = TypeVar("P", bound=type[Policy])
_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: P) -> P:
    """Class decorator: make a policy available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_policy(name: str, context: PolicyContext) -> Policy:
    _load_builtin()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown policy {name!r} (known: {', '.join(sorted(_REGISTRY))})") from None
    return cls(context)


def _load_builtin() -> None:
    # Importing the package registers the shipped policies.
    import festina_hpc.policy.baselines  # noqa: F401
    import festina_hpc.policy.festina  # noqa: F401

