"""A router that asks the policy: an in-memory ``ClusterView`` of live instances, ``place()`` per request.

``LiveCluster`` is festinad's picture of its instances (what it started,
where, how many requests each holds); it implements ``ClusterView`` so the
very policy code measured in the simulator decides here. ``PolicyRouter``
turns each request into a ``policy.types.Arrival`` and carries out the
decision: ``Route`` to an instance (waiting while it loads), ``StartInstance``
through the pluggable ``start_instance`` callback (the Slurm submit, wired in
elsewhere; tests start an in-process server), ``Drop`` as ``NoInstance``.
A start runs as its own task, so a request that stops waiting (the gateway's
timeout) does not cancel it and later requests find the instance ready. An
instance the gateway could not reach (``failed``) turns loading, so nothing is
routed to it, and is checked at once (``on_failed``: festinad); a request
waiting on it when it turns out gone is placed again, and a replacement starts
as a cold start would.

What happened comes back to the policy as the simulator reports it: the
router is also a ``Recorder`` (the gateway hands it each ``CompletionRecord``
beside the database's), so ``policy.feedback`` gets each request that ended,
with the tokens it really generated. ``record`` only appends (it runs on the
gateway's hot path); ``learn`` hands the batch over before the policy's next
decision (a placement, or festinad's scale and consolidate ticks).

Approximations, all on the side of caution: a routed request counts as
running until the gateway reports it done, and its prompt as pending until
then (the instance knows better; the reconcile loop will read its metrics).
The router runs ``place`` only: ``scale``, ``control`` and ``consolidate``
belong to festinad's periodic loops.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from festina_hpc.cluster.figures import USABLE_MEMORY_FRAC
from festina_hpc.cluster.rate import RateMeter
from festina_hpc.daemon.records import CompletionRecord, Outcome
from festina_hpc.daemon.routing import Endpoint, NoInstance
from festina_hpc.policy.base import Policy
from festina_hpc.policy.limits import Refusal, limit_placement
from festina_hpc.policy.types import (
    NO_LIMITS,
    Arrival,
    Drop,
    EndedRequest,
    Ending,
    InstancePhase,
    ModelInfo,
    ModelLimits,
    NodePower,
    Placement,
    Route,
    Slo,
    StartInstance,
)
from festina_hpc.profiles.store import ProfileStore

DEFAULT_CHUNK_TOKENS = 2048  # vLLM's max_num_batched_tokens with chunked prefill
READY_POLL_S = 1.0  # how often a request waiting on a start looks for another ready instance
MAX_PLACEMENTS = 3  # placements of one request whose instance was lost while it waited (bounded, never a loop)
# How the gateway's outcomes end for the policy: a 503 (no instance in time, or the policy's drop) is a
# refusal; the rest (the instance failed, the client left, festinad stopped) cut a request short.
ENDINGS = {Outcome.OK: Ending.COMPLETED, Outcome.NO_INSTANCE: Ending.REFUSED}


def runs_as_mps(tp: int, sm_pct: float) -> bool:
    """Whether an instance's job asks Slurm for an MPS share (``--gres=mps:K``) rather than whole GPUs
    (``--gres=gpu:N``): a share of one GPU. A whole GPU is gpu gres, so it leaves the node's MPS GPU free
    (Slurm 22.05 puts every MPS job of a node on one GPU: an mps:100 job there pends a second one)."""
    return tp == 1 and round(sm_pct) < 100


@dataclass(frozen=True)
class InstanceLaunch:
    """What ``start_instance`` is asked to start: one serving job."""

    instance_id: int
    model: str
    gpu_type: str
    node: int
    gpus: tuple[int, ...]
    sm_pct: float
    batch_cap: int
    memory_fraction: float


StartInstanceFn = Callable[[InstanceLaunch], Awaitable[Endpoint]]
"""Start the instance and return its endpoint once it answers requests; raise to report a failed start."""
StopInstanceFn = Callable[[int, Endpoint], Awaitable[None]]
"""Stop a ready instance (the policy evicted it)."""
FailedInstanceFn = Callable[["LiveInstance"], None]
"""Check an instance the gateway could not reach, now (it is loading again in the view): back to ready
(``ready`` resolved) if it serves, else out of the view (``ready`` failed) so its place can be taken."""


class LiveInstance:
    """An instance as festinad tracks it; attribute names follow ``InstanceView``."""

    def __init__(self, instance_id: int, info: ModelInfo, gpus: tuple[int, ...], node: int, sm_pct: float,
                 batch_cap: int, memory_fraction: float, kv_capacity_tokens: int, now_s: float):
        self.id = instance_id
        self.model = info.name
        self.gpus = gpus
        self.node = node
        self.phase = InstancePhase.LOADING
        self.sm_pct = sm_pct
        self.batch_cap = batch_cap
        self.memory_fraction = memory_fraction
        self.shared = runs_as_mps(len(gpus), sm_pct)  # its job holds an MPS share (else whole GPUs)
        self.kv_capacity_tokens = kv_capacity_tokens
        self.kv_tokens_reserved = 0
        self.chunk_tokens = DEFAULT_CHUNK_TOKENS
        self.pending_prompt_tokens = 0
        self.in_flight = 0  # requests the gateway sent it and has not seen end
        # What the instance itself last reported (festinad polls its /health): it also sees requests
        # that did not come through this gateway, e.g. ones sent before a festinad restart.
        self.reported_in_flight = 0
        self.reported_pending_prompt_tokens = 0
        self.slurm_job_id: int | None = None
        self.ready_at_s = math.inf
        self.last_busy_s = now_s
        self._rate = RateMeter(now_s)
        self.endpoint: Endpoint | None = None
        self.ready: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()
        # The gateway could not reach it (``PolicyRouter.failed``): loading again until it is found serving,
        # or gone (a request waiting on it is then placed again, as one arriving now would be).
        self.lost = False

    @property
    def load(self) -> int:
        return max(self.in_flight, self.reported_in_flight)

    @property
    def running(self) -> int:
        return min(self.load, self.batch_cap)

    @property
    def waiting(self) -> int:
        return max(0, self.load - self.batch_cap)

    @property
    def arrival_rate_per_s(self) -> float:
        return self._rate.last_rate_per_s

    def note_arrival(self, now_s: float) -> None:
        self._rate.note(now_s)


class LiveGpu:
    def __init__(self, gpu_id: int, node: int, clock_mhz: int):
        self.id = gpu_id
        self.node = node
        self.clock_mhz = clock_mhz
        self.instances: list[int] = []
        self.sm_pct_allocated = 0.0
        self.memory_fraction_allocated = 0.0


class LiveNode:
    def __init__(self, node_id: int, gpus: Sequence[int]):
        self.id = node_id
        self.gpus = tuple(gpus)
        self.power = NodePower.ON  # festinad sees nodes Slurm reports up; power saving is Slurm's
        self.ready_at_s = 0.0

    def has_cached(self, model: str) -> bool:
        return False  # no host-memory model cache in the live system yet


class LiveCluster:
    """festinad's instances on ``nodes`` x ``gpus_per_node`` GPUs of one type; a ``ClusterView``."""

    def __init__(self, store: ProfileStore, gpu_type: str, slos: Mapping[str, Slo], nodes: int = 1,
                 gpus_per_node: int = 8, clock: Callable[[], float] = time.monotonic,
                 limits: Mapping[str, ModelLimits] | None = None):
        spec = store.gpu(gpu_type)
        self.spec = spec
        self._gpu_type = spec.name
        self._clock = clock
        self._t0 = clock()
        self.model_info: dict[str, ModelInfo] = {}
        bounds = dict(limits or {})
        for name, slo in slos.items():
            m = store.model(name)
            bound = bounds.get(m.name, bounds.get(name, NO_LIMITS))
            self.model_info[m.name] = ModelInfo.on_gpu(m, spec.name, slo, bound)
        self.node_list = [LiveNode(n, range(n * gpus_per_node, (n + 1) * gpus_per_node)) for n in range(nodes)]
        self.gpu_list = [LiveGpu(g, n.id, spec.max_clock_mhz) for n in self.node_list for g in n.gpus]
        self.live: dict[int, LiveInstance] = {}
        self._by_model: dict[str, list[LiveInstance]] = {m: [] for m in self.model_info}
        self._model_rate = {m: RateMeter() for m in self.model_info}

    # -- ClusterView -------------------------------------------------------------------------------

    @property
    def now_s(self) -> float:
        return self._clock() - self._t0

    @property
    def gpu_type(self) -> str:
        return self._gpu_type

    def model(self, name: str) -> ModelInfo:
        return self.model_info[name]

    def models(self) -> Iterable[ModelInfo]:
        return self.model_info.values()

    def instance(self, instance_id: int) -> LiveInstance:
        return self.live[instance_id]

    def instances(self) -> Iterable[LiveInstance]:
        return self.live.values()

    def instances_of(self, model: str) -> Sequence[LiveInstance]:
        return self._by_model.get(model, ())

    def gpu(self, gpu_id: int) -> LiveGpu:
        return self.gpu_list[gpu_id]

    def gpus(self) -> Sequence[LiveGpu]:
        return self.gpu_list

    def node(self, node_id: int) -> LiveNode:
        return self.node_list[node_id]

    def nodes(self) -> Sequence[LiveNode]:
        return self.node_list

    def free_gpus(self) -> Iterator[int]:
        return (g.id for g in self.gpu_list if not g.instances)

    def model_rate_per_s(self, model: str) -> float:
        return self._model_rate[model].rate_per_s(self.now_s)

    # -- changes -----------------------------------------------------------------------------------

    def note_arrival(self, model: str) -> None:
        self._model_rate[model].note(self.now_s)

    def add(self, decision: StartInstance, instance_id: int, shared: bool | None = None) -> LiveInstance:
        """Allocate a new (loading) instance; ``NoInstance`` when the decision does not fit. ``shared``: its
        job holds an MPS share (default: as ``runs_as_mps`` says; an adopted user's mps:100 job is shared)."""
        info, gpus, nodes = self.check(decision)
        usable = self.spec.memory_bytes * USABLE_MEMORY_FRAC
        kv_tokens = int((decision.memory_fraction * usable - info.weights_bytes_per_gpu)
                        / info.kv_bytes_per_token_per_gpu)
        inst = LiveInstance(instance_id, info, gpus, nodes.pop(), decision.sm_pct, decision.batch_cap,
                            decision.memory_fraction, max(0, kv_tokens), self.now_s)
        if shared is not None:
            inst.shared = shared
        self.live[inst.id] = inst
        self._by_model[inst.model].append(inst)
        self._allocate(inst, +1)
        return inst

    def _allocate(self, inst: LiveInstance, sign: int) -> None:
        for g in inst.gpus:
            gpu = self.gpu_list[g]
            if sign > 0:
                gpu.instances.append(inst.id)
            else:
                gpu.instances.remove(inst.id)
            gpu.sm_pct_allocated += sign * inst.sm_pct
            gpu.memory_fraction_allocated += sign * inst.memory_fraction

    def move(self, inst: LiveInstance, gpus: tuple[int, ...]) -> None:
        """Put the instance on ``gpus`` (where Slurm says its job runs), unchecked: the view follows Slurm."""
        self._allocate(inst, -1)
        inst.gpus = gpus
        inst.node = self.gpu_list[gpus[0]].node
        self._allocate(inst, +1)

    # -- Slurm's MPS placement ----------------------------------------------------------------------

    def mps_gpu(self, node: int) -> int | None:
        """The GPU of ``node`` where Slurm 22.05 puts the node's MPS jobs: the one they already share (all
        land on one GPU; festinad cannot choose it), else the lowest free GPU (Slurm's pick; the job's
        allocated GRES index corrects the view once it runs), else None (every GPU held as a whole GPU)."""
        gpus = [self.gpu_list[g] for g in self.node_list[node].gpus]
        shared = [g for g in gpus if any(self.live[i].shared for i in g.instances)]
        if shared:
            return max(shared, key=lambda g: (g.sm_pct_allocated, -g.id)).id
        return next((g.id for g in gpus if not g.instances), None)

    def slurm_fit(self, decision: StartInstance) -> StartInstance:
        """``decision`` as Slurm will carry it out; ``NoInstance`` when it cannot.

        A whole-GPU start is as asked. An MPS share goes where Slurm puts the node's MPS jobs
        (``mps_gpu``): kept when the policy chose that GPU or the node has no MPS job yet (an empty
        GPU there is as good as the one chosen); on an empty GPU that is not the MPS GPU it runs as a
        whole GPU (alone there, as the policy planned, with every SM); moved to the MPS GPU when the
        policy meant to share another, busy GPU and the MPS GPU has the room; else refused.
        """
        if not runs_as_mps(len(decision.gpus), decision.sm_pct) or not decision.gpus:
            return decision
        (g,) = decision.gpus
        if not 0 <= g < len(self.gpu_list):
            return decision  # check() refuses it
        m = self.mps_gpu(self.gpu_list[g].node)
        if m == g:
            return decision
        if m is not None and not self.gpu_list[m].instances:
            return replace(decision, gpus=(m,))
        if not self.gpu_list[g].instances:
            return replace(decision, sm_pct=100.0)
        if m is not None and self._fits(m, decision):
            return replace(decision, gpus=(m,))
        raise NoInstance(f"Slurm puts MPS jobs of node {self.gpu_list[g].node} on GPU {m}, which has no room "
                         f"for {decision.model} at {decision.sm_pct:g}% SMs (GPU {g} was asked)")

    def _fits(self, g: int, decision: StartInstance) -> bool:
        gpu = self.gpu_list[g]
        return (gpu.sm_pct_allocated + decision.sm_pct <= 100 + 1e-6
                and gpu.memory_fraction_allocated + decision.memory_fraction <= 1 + 1e-6)

    def check(self, decision: StartInstance) -> tuple[ModelInfo, tuple[int, ...], set[int]]:
        """``NoInstance`` unless ``decision`` fits: the model, its GPUs (distinct, one node) and their room."""
        info = self.model_info.get(decision.model)
        if info is None:
            raise NoInstance(f"policy started unknown model {decision.model}")
        gpus = tuple(decision.gpus)
        if len(set(gpus)) != info.tp or not all(0 <= g < len(self.gpu_list) for g in gpus):
            raise NoInstance(f"policy gave {decision.model} GPUs {gpus}; it needs {info.tp} distinct ones")
        nodes = {self.gpu_list[g].node for g in gpus}
        if len(nodes) != 1:
            raise NoInstance(f"policy gave {decision.model} GPUs {gpus} on several nodes")
        for g in gpus:
            if not self._fits(g, decision):
                raise NoInstance(f"policy overfilled GPU {g} with {decision.model}")
        return info, gpus, nodes

    def remove(self, inst: LiveInstance) -> None:
        if self.live.pop(inst.id, None) is None:
            return
        inst.phase = InstancePhase.STOPPED
        self._by_model[inst.model].remove(inst)
        self._allocate(inst, -1)


class PolicyRouter:
    """``Router`` over a ``LiveCluster``: the policy places, ``start_instance`` starts."""

    def __init__(self, policy: Policy, cluster: LiveCluster, start_instance: StartInstanceFn,
                 stop_instance: StopInstanceFn | None = None,
                 new_instance_id: Callable[[StartInstance], int] | None = None,
                 on_refused: Callable[[str, Refusal, Placement], None] | None = None,
                 on_failed: FailedInstanceFn | None = None):
        self.policy = policy
        # Checks an instance the gateway could not reach (festinad: its job and /health). None: such an
        # instance is dropped from the view at once and stopped.
        self.on_failed = on_failed
        # Told of each start the catalogue's bounds refused (model, what and why, the placement instead).
        self.on_refused = on_refused
        self.cluster = cluster
        self.start_instance = start_instance
        self.stop_instance = stop_instance
        # Records of requests that ended since the policy last learnt (record() appends, learn() hands over).
        self._ended: list[CompletionRecord] = []
        self._request_ids = itertools.count()
        self._instance_ids = itertools.count()
        # festinad passes the database's id allocator, so ids survive a restart.
        self._new_id = new_instance_id or (lambda decision: next(self._instance_ids))
        self._tasks: set[asyncio.Task[None]] = set()  # starts and stops in flight, kept from garbage collection
        # Instance id -> prompt tokens of its requests in arrival order. done() names only the endpoint,
        # so it releases the oldest request's prompt: requests mostly finish in arrival order, and the
        # count of requests (what the policy weighs most) is exact either way.
        self._prompts: dict[int, list[int]] = {}

    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        for placement in range(1, MAX_PLACEMENTS + 1):
            inst = self._place(model, prompt_tokens)
            try:
                return await self._wait(inst, model, prompt_tokens)
            except NoInstance:
                # An instance found unreachable and then gone (its job ended) is no verdict on this request:
                # placed again, as a request arriving now would be (a replacement starts as a cold start).
                if not inst.lost or placement == MAX_PLACEMENTS:
                    raise
        raise AssertionError("unreachable")

    def _place(self, model: str, prompt_tokens: int) -> LiveInstance:
        """Ask the policy; the instance the request goes to (a start begun), counted against it."""
        view = self.cluster
        view.note_arrival(model)
        self.learn()
        request = Arrival(next(self._request_ids), view.now_s, model, prompt_tokens)
        decision, refused = limit_placement(self.policy.place(request, view), view)
        if refused is not None and self.on_refused is not None:
            self.on_refused(model, refused, decision)
        if isinstance(decision, Drop):
            raise NoInstance(f"no capacity for {model}: {decision.reason}")
        if isinstance(decision, StartInstance):
            if decision.model != model:
                raise NoInstance(f"policy started {decision.model} for a {model} request")
            inst = self._start(decision)
        else:
            assert isinstance(decision, Route)
            found = view.live.get(decision.instance_id)
            if found is None or found.phase > InstancePhase.READY or found.model != model:
                raise NoInstance(f"policy routed {model} to instance {decision.instance_id}, which cannot take it")
            inst = found
        inst.note_arrival(view.now_s)
        self._hold(inst, prompt_tokens)
        return inst

    async def _wait(self, inst: LiveInstance, model: str, prompt_tokens: int) -> Endpoint:
        """``inst``'s endpoint once it is ready (or another instance's that is ready first)."""
        while True:
            try:
                # Shielded: the gateway's timeout cancels this wait, never the start itself.
                return await asyncio.wait_for(asyncio.shield(inst.ready), READY_POLL_S)
            except TimeoutError:
                # A start can stay pending in Slurm (a job festinad did not know of took the GPU)
                # while another instance of the model is ready (adopted, or started meanwhile):
                # the request goes there rather than wait for a start it need not wait for.
                other = self._ready_instance(model)
                if other is None:
                    continue
                self._release(inst.id, prompt_tokens)
                self._hold(other, prompt_tokens)
                inst = other
            except BaseException:
                self._release(inst.id, prompt_tokens)
                raise

    def _hold(self, inst: LiveInstance, prompt_tokens: int) -> None:
        """Count a request against ``inst`` until the gateway reports it done."""
        inst.in_flight += 1
        inst.pending_prompt_tokens += prompt_tokens
        inst.last_busy_s = self.cluster.now_s
        self._prompts.setdefault(inst.id, []).append(prompt_tokens)

    def _ready_instance(self, model: str) -> LiveInstance | None:
        """The least loaded ready instance of ``model``, if any."""
        ready = [i for i in self.cluster.instances_of(model) if i.phase is InstancePhase.READY]
        return min(ready, key=lambda i: i.load, default=None)

    def done(self, endpoint: Endpoint) -> None:
        if endpoint.instance_id is not None:
            prompts = self._prompts.get(endpoint.instance_id)
            self._release(endpoint.instance_id, prompts[0] if prompts else 0)

    def failed(self, endpoint: Endpoint) -> None:
        """The gateway could not reach ``endpoint``: its instance, if still ready there, turns loading (the
        policy routes there only to wait, as for a cold start, and may start another) and is checked now
        (``on_failed``); without a checker it leaves the view at once, so its place can be taken."""
        inst = self.cluster.live.get(endpoint.instance_id) if endpoint.instance_id is not None else None
        if inst is None or inst.phase is not InstancePhase.READY or inst.endpoint is None \
                or inst.endpoint.url != endpoint.url:
            return  # already reported by another request, stopping, or moved
        inst.phase = InstancePhase.LOADING
        inst.ready = asyncio.get_running_loop().create_future()
        inst.lost = True
        if self.on_failed is not None:
            self.on_failed(inst)
            return
        self.cluster.remove(inst)
        inst.ready.set_exception(NoInstance(f"instance {inst.id} of {inst.model} at {endpoint.url} is unreachable"))
        inst.ready.exception()  # retrieved here, so one nobody waits for logs no "never retrieved"
        if self.stop_instance is not None:
            self._spawn(self.stop_instance(inst.id, endpoint))

    def _release(self, instance_id: int, prompt_tokens: int) -> None:
        inst = self.cluster.live.get(instance_id)
        prompts = self._prompts.get(instance_id)
        if prompts and prompt_tokens in prompts:
            prompts.remove(prompt_tokens)
        if inst is None:
            return
        inst.in_flight = max(0, inst.in_flight - 1)
        inst.pending_prompt_tokens = max(0, inst.pending_prompt_tokens - prompt_tokens)
        inst.last_busy_s = self.cluster.now_s

    def start(self, decision: StartInstance) -> LiveInstance:
        """Carry out a ``StartInstance`` (a placement's or a ``scale`` plan's); the bring-up runs on its own."""
        return self._start(decision)

    def _start(self, decision: StartInstance) -> LiveInstance:
        victims = [self.cluster.live.get(i) for i in decision.evict]
        for victim in victims:
            if victim is None or victim.phase is not InstancePhase.READY or victim.in_flight:
                raise NoInstance(f"policy evicted instance {decision.evict}, which is not idle")
        for victim in victims:
            assert victim is not None and victim.endpoint is not None
            self.cluster.remove(victim)
            if self.stop_instance is not None:
                self._spawn(self.stop_instance(victim.id, victim.endpoint))
        decision = self.cluster.slurm_fit(decision)
        self.cluster.check(decision)
        inst = self.cluster.add(decision, self._new_id(decision))
        launch = InstanceLaunch(inst.id, inst.model, self.cluster.gpu_type, inst.node, inst.gpus, inst.sm_pct,
                                inst.batch_cap, inst.memory_fraction)
        self._spawn(self._bring_up(inst, launch))
        return inst

    async def _bring_up(self, inst: LiveInstance, launch: InstanceLaunch) -> None:
        try:
            endpoint = await self.start_instance(launch)
        except Exception as exc:
            self.cluster.remove(inst)
            inst.ready.set_exception(NoInstance(f"instance {inst.id} of {inst.model} failed to start: {exc}"))
            inst.ready.exception()  # retrieved here, so a start nobody waits for logs no "never retrieved"
            return
        inst.endpoint = replace(endpoint, instance_id=inst.id)
        inst.phase = InstancePhase.READY
        inst.ready_at_s = self.cluster.now_s
        inst.ready.set_result(inst.endpoint)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def record(self, record: CompletionRecord) -> None:
        """The gateway's ``Recorder``: keep a request that ended for the policy's next ``learn()``. Only an
        append: it runs on the gateway's event loop after each response."""
        if record.outcome is not Outcome.IN_FLIGHT:  # a checkpoint, not an end: its final record follows
            self._ended.append(record)

    def learn(self) -> None:
        """Hand the requests that ended since the last call to ``policy.feedback``, in the order they ended."""
        if not self._ended:
            return
        ended, self._ended = self._ended, []
        self.policy.feedback([EndedRequest(r.model, r.prompt_tokens, r.output_tokens,
                                           ENDINGS.get(r.outcome, Ending.FAILED), r.ttft_s, r.tbt_mean_s)
                              for r in ended])

    async def close(self) -> None:
        """Cancel starts and stops still in flight (festinad shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
