"""The data that flows between a driver (simulator or daemon) and a policy.

Arrivals and SLOs come in; decisions go out as frozen dataclasses: where a
request goes (``Route``, ``Start``, ``Drop``), what a GPU's settings are
(``GpuSettings``), and what the cluster should change (a ``Plan`` of
actions). The read side is a set of small protocols (``ClusterView`` and the
views it hands out) that the driver implements over its own live state, so a
policy never copies the cluster and never mutates it. What happened to the
requests comes back as ``EndedRequest``s (``Policy.feedback``): a policy
learns output lengths from these, never from a request's future.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from festina_hpc.profiles.specs import ModelSpec


@dataclass(frozen=True)
class Arrival:
    """A request as a policy sees it when it arrives: what it asks of which model, not how long it will run.

    Its output length is the request's future (the engine stops at an end-of-sequence token or
    ``max_tokens``), so a policy learns typical output lengths from ``EndedRequest``s instead.
    """

    id: int
    arrival_s: float
    model: str
    prompt_tokens: int


@dataclass(frozen=True)
class Request:
    """One inference request of a workload: a prompt of ``prompt_tokens`` that generates ``output_tokens``.

    The simulator's (a trace knows every request's length); a policy is handed its ``arrival()``.
    """

    id: int
    arrival_s: float
    model: str
    prompt_tokens: int
    output_tokens: int

    def arrival(self) -> Arrival:
        """What a policy may know of the request when it arrives."""
        return Arrival(self.id, self.arrival_s, self.model, self.prompt_tokens)


class Ending(StrEnum):
    """How a request ended, as its driver reports it to the policy."""

    COMPLETED = "completed"  # served to its end
    REFUSED = "refused"  # never served: the policy dropped it, or no instance came in time
    FAILED = "failed"  # cut: the instance failed, the client hung up, or the driver stopped


@dataclass(frozen=True)
class EndedRequest:
    """What the driver reports of a request once it ended (``Policy.feedback``): its true token counts
    and latencies. A refused request generated nothing and has no latencies; a failed one may have
    generated part of its output."""

    model: str
    prompt_tokens: int
    output_tokens: int  # generated (a completed request's true output length)
    ended: Ending
    ttft_s: float | None = None  # None: no token came
    tbt_s: float | None = None  # mean time between its tokens; None: unknown (fewer than two tokens)


@dataclass(frozen=True)
class Slo:
    """Per-model service level: time to first token, and mean time between the request's tokens.

    A prompt longer than ``reference_prompt_tokens`` gets ``ttft_s_per_token`` more TTFT per
    extra token, so that a long prompt's SLO scales with its own unloaded prefill time.
    """

    ttft_s: float
    tbt_s: float
    ttft_s_per_token: float = 0.0
    reference_prompt_tokens: int = 0

    def ttft_for(self, prompt_tokens: int) -> float:
        """The TTFT SLO of a request with ``prompt_tokens``."""
        return self.ttft_s + self.ttft_s_per_token * max(0, prompt_tokens - self.reference_prompt_tokens)


# -- what a policy reads --------------------------------------------------------------------


class InstancePhase(IntEnum):
    """Lifecycle of a model instance; the order makes "no longer serving" one comparison."""

    LOADING = 0  # weights loading (cold start, or a migration's target)
    READY = 1  # serving
    DRAINING = 2  # finishing what it holds; takes no new requests
    STOPPED = 3


class NodePower(IntEnum):
    OFF = 0
    WAKING = 1  # powering on: draws power, cannot serve until ready_at_s
    ON = 2


@dataclass(frozen=True)
class ModelLimits:
    """An operator's bounds on a model's instances (the catalogue's), enforced by the driver on any
    policy's decisions (``policy/limits.py``); the defaults bound nothing."""

    min_instances: int = 0  # kept serving even when idle: never stopped below, started when missing
    max_instances: int | None = None  # no plan starts more; None: no bound
    keep_alive_s: float | None = None  # idle seconds before the model scales to zero; None: the policy's own


NO_LIMITS = ModelLimits()


@dataclass(frozen=True)
class ModelInfo:
    """What a policy needs to know of a model on this cluster's GPU type."""

    name: str
    tp: int  # GPUs per instance
    weights_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    slo: Slo
    limits: ModelLimits = NO_LIMITS

    @classmethod
    def on_gpu(cls, spec: ModelSpec, gpu_type: str, slo: Slo, limits: ModelLimits = NO_LIMITS) -> ModelInfo:
        """The model as a policy sees it on ``gpu_type``: weights and KV split over its tensor-parallel GPUs."""
        tp = spec.tp_on(gpu_type)
        return cls(spec.name, tp, spec.weights_bytes / tp, spec.kv_bytes_per_token / tp, slo, limits)


class InstanceView(Protocol):
    """A model instance as the driver sees it now (read-only)."""

    @property
    def id(self) -> int: ...
    @property
    def model(self) -> str: ...
    @property
    def gpus(self) -> tuple[int, ...]: ...
    @property
    def node(self) -> int: ...
    @property
    def phase(self) -> InstancePhase: ...
    @property
    def sm_pct(self) -> float: ...
    @property
    def batch_cap(self) -> int: ...
    @property
    def memory_fraction(self) -> float: ...
    @property
    def running(self) -> int:
        """Sequences admitted (prefilled or decoding)."""
        ...
    @property
    def waiting(self) -> int:
        """Requests queued for admission."""
        ...
    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens one step may prefill."""
        ...
    @property
    def pending_prompt_tokens(self) -> int:
        """Prompt tokens still to prefill: queued requests' and admitted ones' remaining chunks."""
        ...
    @property
    def kv_tokens_reserved(self) -> int: ...
    @property
    def kv_capacity_tokens(self) -> int: ...
    @property
    def ready_at_s(self) -> float: ...
    @property
    def last_busy_s(self) -> float:
        """When the instance last held a request (now while it holds one)."""
        ...
    @property
    def arrival_rate_per_s(self) -> float:
        """Recent rate of requests routed to it (exponentially weighted)."""
        ...


class GpuView(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def node(self) -> int: ...
    @property
    def clock_mhz(self) -> int: ...
    @property
    def instances(self) -> Sequence[int]: ...
    @property
    def sm_pct_allocated(self) -> float:
        """Sum of the SM shares of its instances (100 = fully partitioned)."""
        ...
    @property
    def memory_fraction_allocated(self) -> float:
        """Sum of the memory fractions of its instances (1 = full)."""
        ...


class NodeView(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def power(self) -> NodePower: ...
    @property
    def gpus(self) -> Sequence[int]: ...
    @property
    def ready_at_s(self) -> float: ...
    def has_cached(self, model: str) -> bool:
        """Whether the model's weights are in this node's host memory (a fast reload)."""
        ...


class ClusterView(Protocol):
    """The driver's live cluster, read-only. Lookups are O(1); iterations are over what is asked for."""

    @property
    def now_s(self) -> float: ...
    @property
    def gpu_type(self) -> str: ...
    def model(self, name: str) -> ModelInfo: ...
    def models(self) -> Iterable[ModelInfo]: ...
    def instance(self, instance_id: int) -> InstanceView: ...
    def instances(self) -> Iterable[InstanceView]:
        """Every instance not yet stopped."""
        ...
    def instances_of(self, model: str) -> Sequence[InstanceView]:
        """The model's instances not yet stopped, oldest first."""
        ...
    def gpu(self, gpu_id: int) -> GpuView: ...
    def gpus(self) -> Sequence[GpuView]: ...
    def node(self, node_id: int) -> NodeView: ...
    def nodes(self) -> Sequence[NodeView]: ...
    def free_gpus(self) -> Iterable[int]:
        """GPUs holding no instance on nodes that are on or waking, lowest id first (lazily)."""
        ...
    def model_rate_per_s(self, model: str) -> float:
        """Recent arrival rate of the model's requests (exponentially weighted)."""
        ...


# -- what a policy decides ------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Send the request to an existing instance."""

    instance_id: int


@dataclass(frozen=True)
class StartInstance:
    """Start an instance of ``model`` on ``gpus`` (one per tensor-parallel rank, all on one node).

    ``memory_fraction`` of each GPU's usable memory is the instance's (weights plus KV cache);
    the fractions of the instances sharing a GPU sum to at most 1. A node that is off is woken
    first, and the instance loads once it is up. ``evict`` names idle instances (ready, holding
    no request) to stop first to make room, as a keep-alive cache evicts on demand; the start
    is checked as if they were gone, and nothing is stopped when the start is refused.
    """

    model: str
    gpus: tuple[int, ...]
    sm_pct: float = 100.0
    batch_cap: int = 256
    memory_fraction: float = 1.0
    evict: tuple[int, ...] = ()


@dataclass(frozen=True)
class Drop:
    """Refuse the request (it counts as an SLO miss)."""

    reason: str


Placement = Route | StartInstance | Drop


@dataclass(frozen=True)
class GpuSettings:
    """A GPU's control settings; ``None`` or a missing instance leaves that setting unchanged."""

    clock_mhz: int | None = None
    sm_pct: Mapping[int, float] = field(default_factory=dict)  # instance id -> SM share
    batch_cap: Mapping[int, int] = field(default_factory=dict)  # instance id -> max sequences
    # instance id -> prompt tokens a step may prefill (chunked prefill's chunk): smaller chunks keep
    # the time between tokens of decoding sequences short while prompts prefill beside them
    chunk_tokens: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class StopInstance:
    """Drain the instance (finish what it holds, take nothing new), then free its GPUs."""

    instance_id: int


@dataclass(frozen=True)
class Migrate:
    """Move an instance to ``gpus``: the target loads, takes the queue when ready, the source drains."""

    instance_id: int
    gpus: tuple[int, ...]
    sm_pct: float = 100.0
    memory_fraction: float = 1.0


@dataclass(frozen=True)
class MoveQueued:
    """Move up to ``count`` requests still waiting for admission from one instance to another.

    Requests leave from the back of the source's queue (the latest arrivals, in their order)
    and join the back of the target's; both must serve the same model and take requests.
    Queued requests hold no KV cache, so the move is free (Llumnix's migration of a request
    that has not started yet).
    """

    from_instance: int
    to_instance: int
    count: int


@dataclass(frozen=True)
class PowerOff:
    """Power a node down (it must hold no instance)."""

    node: int


@dataclass(frozen=True)
class PowerOn:
    node: int


Action = StartInstance | StopInstance | Migrate | MoveQueued | PowerOff | PowerOn


@dataclass(frozen=True)
class Plan:
    """Cluster changes a policy asks for, in order, with a reason for the audit trail."""

    actions: tuple[Action, ...] = ()
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.actions)
