"""The simulated cluster: nodes, GPUs and model instances, and how they serve, load and draw power.

Serving follows vLLM's continuous batching with chunked prefill, per
instance. At each step boundary an instance admits waiting requests (FIFO, up
to its batch cap and its KV-cache room, reserving each request's prompt plus
output tokens so no sequence is ever preempted). A step then decodes one
token for every decoding sequence and, with what is left of the step's token
budget (at least ``min_prefill_chunk``), prefills the next chunk of the
admitted prompts in order; a prompt's first token comes at the end of the
step that finishes its prefill (TTFT = queueing + load wait + its chunks).
Such a mixed step is one forward pass: the chunk's prefill time plus what the
decode batch adds over a batch of one (the step overhead and the weight reads
are paid once), from the profiles. With nothing to prefill, the batch does not change between
events, so a run of k decode steps is one event: k is the number of steps
until the next sequence finishes, cut short at the next step boundary when a
request arrives. A request's TBT is its mean time between tokens (first token
to last).

Latency and power come from the profile tables at the instance's batch, mean
context, SM share (MPS) and its GPU's clock. A clock asked for takes effect
``clock_change_s`` later. Co-resident instances share the GPU's HBM bandwidth:
a step's memory-bound part stretches with what the co-residents stream
(``HbmModel``). A GPU draws idle power plus the dynamic power (profile power
minus idle) of every co-resident instance's current step, capped at TDP; a GPU
that serves nothing but holds a loaded model (a CUDA context) draws its
``idle_with_context_w``; powered-on nodes add a static power; waking nodes
draw static and GPU idle power and serve nothing. Energy is integrated
exactly over these piecewise-constant powers, split into GPU active, GPU
idle, node static, cold starts (loading), migrations and share restarts.

An MPS client's SM share is fixed when its CUDA context is created, so unless
a site declares that its engine can change it (``[gpu] live_share_change``), a
share change is a share restart (``Simulation._restart``): a replacement
instance at the new share loads beside the old one, which serves until the
replacement is ready (or, where the GPU lacks memory for both copies, drains
first). While both exist, each GPU's ``sm_pct_allocated`` counts the pair at
the larger of the two shares (the old one's SMs stay in use until it stops):
the old instance reserves its share, the replacement what the new one adds
(``sm_pct_reserved``), and takes its whole share when the old one is gone.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from festina_hpc.cluster.rate import RateMeter
from festina_hpc.policy.types import InstancePhase, ModelInfo, NodePower, Request
from festina_hpc.profiles.physics import SM_SATURATION, SMOOTH_MAX_K, PhysicsParams
from festina_hpc.profiles.specs import GpuSpec, ModelSpec
from festina_hpc.profiles.table import ProfileTable

_NO_POWER_W = 1e-6  # dynamic power below this is float residue of steps that ended, not a step


class Activity(IntEnum):
    IDLE = 0
    LOADING = 1
    PREFILL = 2
    DECODE = 3


@dataclass(frozen=True)
class HbmModel:
    """HBM bandwidth shared by co-resident instances: how much a step of one model on one GPU type
    slows when its co-residents stream HBM too.

    The profile tables give each instance the whole GPU's HBM bandwidth (any SM share of at least
    ``SM_SATURATION``), as if it were alone. Under MPS the co-residents' kernels run at once and
    contend for the same HBM. A step's terms are those of profiles/physics.py: ``t_memory`` (the
    bytes it reads, weights plus KV cache, over its bandwidth) and ``t_compute``, combined by the
    roofline's smooth max. A co-resident ``j`` whose current step reads ``bytes_j`` in ``latency_j``
    loads the HBM with ``load_j = bytes_j / (latency_j * bandwidth)``, the share of the bandwidth it
    draws on average. While streaming, a step gets the bandwidth its co-residents leave it; with
    their streaming independent of its own, its memory time stretches by ``1 + sum_j load_j``:
    exact when they stream all the time (two streams halve each other's bandwidth), first order
    in between, and never less than the combined demand over the bandwidth (the saturated case).
    The step's latency grows by ``smooth_max(t_c, m t_m) - smooth_max(t_c, t_m)`` with
    ``m = 1 + sum_j load_j``: a decode step (memory-bound) slows by up to that factor on its memory
    time, a prefill (compute-bound) barely.

    Approximations: a step's stretch is fixed when it starts (a decode run, one event for many
    steps, keeps its latency to its end); to bound the error, co-residents' decode runs end at their
    next step boundary when an idle instance starts a step, and start again at the new load; an
    instance going idle frees bandwidth at its co-residents' next boundary only. A step's dynamic
    energy is unchanged (the same bytes and FLOPs): the stretch lowers its dynamic power and adds
    GPU idle and node static time, not extra dynamic energy. Multi-GPU instances take their most
    loaded GPU (the slowest shard paces the step).
    """

    weights_bytes: float  # read by every step, per GPU
    kv_bytes_per_token: float  # per GPU
    flops_per_token: float  # 2 x parameters / tp
    attention_width: float  # layers x heads x head_dim / tp (attention FLOPs per token per context token)
    bandwidth_bps: float  # effective HBM bandwidth of one GPU: peak x eff_memory
    flops_per_s: float  # effective tensor FLOP/s of one GPU: peak x eff_compute
    clock_time_frac: float  # share of compute time that scales with 1/clock
    max_clock_mhz: float

    @classmethod
    def of(cls, gpu: GpuSpec, model: ModelSpec, params: PhysicsParams | None) -> HbmModel:
        """Without fitted parameters (a profiles folder with no calibration.toml) the peak figures
        stand in, which understates contention (each step's own demand looks smaller)."""
        tp = model.tp_on(gpu.name)
        return cls(weights_bytes=model.weights_bytes / tp, kv_bytes_per_token=model.kv_bytes_per_token / tp,
                   flops_per_token=2.0 * model.params_b * 1e9 / tp,
                   attention_width=model.layers * model.heads * model.head_dim / tp,
                   bandwidth_bps=gpu.memory_bandwidth_gbs * 1e9 * (params.eff_memory if params else 1.0),
                   flops_per_s=gpu.peak_tflops * 1e12 * (params.eff_compute if params else 1.0),
                   clock_time_frac=params.clock_time_frac if params else 1.0,
                   max_clock_mhz=float(gpu.max_clock_mhz))

    def stretch_s(self, step_bytes: float, flops: float, sm_pct: float, clock_mhz: float, others_load: float) -> float:
        """How much longer a step takes while co-residents load the HBM by ``others_load``."""
        s = sm_pct / 100.0
        t_memory = step_bytes / (self.bandwidth_bps * min(1.0, s / SM_SATURATION))
        a = self.clock_time_frac
        t_compute = flops / (self.flops_per_s * s) * (a * self.max_clock_mhz / clock_mhz + 1.0 - a)
        k = SMOOTH_MAX_K
        alone = (t_compute**k + t_memory**k) ** (1.0 / k)
        shared = (t_compute**k + ((1.0 + others_load) * t_memory) ** k) ** (1.0 / k)
        return shared - alone


@dataclass
class RequestRecord:
    request: Request
    first_token_s: float = math.nan
    finish_s: float = math.nan
    dropped: bool = False


class SimNode:
    def __init__(self, node_id: int, gpus: Sequence[int]):
        self.id = node_id
        self.gpus = tuple(gpus)
        self.power = NodePower.ON
        self.ready_at_s = 0.0
        self.cache: deque[str] = deque()  # models in host memory, most recent last
        self.powered_s = 0.0
        self.last_s = 0.0
        # Power saving's idle timer: since when the node holds no instance, and the version a
        # pending suspend event must carry (a start there, or a power change, supersedes it).
        self.idle_since_s = 0.0
        self.idle_version = 0

    def has_cached(self, model: str) -> bool:
        return model in self.cache

    def remember(self, model: str, capacity: int) -> None:
        if model in self.cache:
            self.cache.remove(model)
        self.cache.append(model)
        while len(self.cache) > capacity:
            self.cache.popleft()


class SimGpu:
    def __init__(self, gpu_id: int, node: int, spec: GpuSpec):
        self.id = gpu_id
        self.node = node
        self.spec = spec
        self.clock_mhz = spec.max_clock_mhz
        self.instances: list[int] = []
        self.sm_pct_allocated = 0.0
        self.memory_fraction_allocated = 0.0
        self.powered = True
        self.holds_context = False  # an instance is loaded and ready (or draining): a CUDA context is held
        # Energy accounting: piecewise-constant power since last_s.
        self.last_s = 0.0
        self.active_w = 0.0  # dynamic power of serving steps
        self.loading_w = 0.0  # dynamic power of loads
        self.loading_is_migration = False
        self.loading_is_share_restart = False
        self.energy_active_j = 0.0
        self.energy_idle_j = 0.0
        self.energy_cold_start_j = 0.0
        self.energy_migration_j = 0.0
        self.energy_share_restart_j = 0.0
        self.busy_loading_only = False

    @property
    def power_w(self) -> float:
        if not self.powered:
            return 0.0
        return min(self.spec.tdp_w, self._idle_w() + self.active_w + self.loading_w)

    def _idle_w(self) -> float:
        """The power of the GPU's idle state: with a CUDA context held and nothing running, the
        driver keeps it in P0 (idle_with_context_w); while it serves, the profile's step power counts
        from the bare idle (the tables were measured with a context held, so that power includes it)."""
        if self.holds_context and self.active_w + self.loading_w <= _NO_POWER_W:
            return self.spec.idle_with_context_w
        return self.spec.idle_w

    def integrate(self, now_s: float) -> None:
        dt = now_s - self.last_s
        if dt <= 0.0:
            return
        self.last_s = now_s
        if not self.powered:
            return
        total_w = self.power_w
        idle_w = self._idle_w()
        dynamic_w = total_w - idle_w
        # Split the (possibly capped) dynamic power between serving and loading in proportion.
        raw_dynamic_w = self.active_w + self.loading_w
        load_share = self.loading_w / raw_dynamic_w if raw_dynamic_w > 0 else 0.0
        load_j = dynamic_w * load_share * dt
        # A GPU that only loads would not be powered for anything else: its idle power is the load's too.
        idle_to_load = self.busy_loading_only
        if self.loading_is_share_restart:
            self.energy_share_restart_j += load_j + (idle_w * dt if idle_to_load else 0.0)
        elif self.loading_is_migration:
            self.energy_migration_j += load_j + (idle_w * dt if idle_to_load else 0.0)
        else:
            self.energy_cold_start_j += load_j + (idle_w * dt if idle_to_load else 0.0)
        if not idle_to_load:
            self.energy_idle_j += idle_w * dt
        self.energy_active_j += dynamic_w * (1.0 - load_share) * dt

    @property
    def energy_j(self) -> float:
        return (self.energy_active_j + self.energy_idle_j + self.energy_cold_start_j + self.energy_migration_j
                + self.energy_share_restart_j)


class RecordQueue(deque[RequestRecord]):
    """Requests waiting for admission, with their prompt tokens summed as they come and go (a
    policy reads ``pending_prompt_tokens`` on every placement: it must not cost a pass over the
    queue)."""

    def __init__(self, records: Iterable[RequestRecord] = ()):
        super().__init__()
        self.prompt_tokens = 0
        self.extend(records)

    def append(self, record: RequestRecord) -> None:
        super().append(record)
        self.prompt_tokens += record.request.prompt_tokens

    def appendleft(self, record: RequestRecord) -> None:
        super().appendleft(record)
        self.prompt_tokens += record.request.prompt_tokens

    def extend(self, records: Iterable[RequestRecord]) -> None:
        for record in records:
            self.append(record)

    def pop(self) -> RequestRecord:  # type: ignore[override]  # deque.pop takes no index
        record = super().pop()
        self.prompt_tokens -= record.request.prompt_tokens
        return record

    def popleft(self) -> RequestRecord:
        record = super().popleft()
        self.prompt_tokens -= record.request.prompt_tokens
        return record

    def clear(self) -> None:
        super().clear()
        self.prompt_tokens = 0


class SimInstance:
    """A model instance; attribute names follow ``InstanceView``."""

    def __init__(self, instance_id: int, info: ModelInfo, table: ProfileTable, gpus: tuple[int, ...], node: int,
                 sm_pct: float, batch_cap: int, memory_fraction: float, kv_capacity_tokens: int, now_s: float):
        self.id = instance_id
        self.info = info
        self.model = info.name
        self.table = table
        self.gpus = gpus
        self.node = node
        self.phase = InstancePhase.LOADING
        self.sm_pct = sm_pct
        self.batch_cap = batch_cap
        self.memory_fraction = memory_fraction
        self.kv_capacity_tokens = kv_capacity_tokens
        self.kv_tokens_reserved = 0
        self.ready_at_s = math.inf
        self.started_s = now_s
        self.last_busy_s = now_s
        self._rate = RateMeter(now_s)
        self.queue = RecordQueue()  # waiting for admission
        # Decoding sequences: a heap of (step at which it finishes, request id, record).
        self._decoding: list[tuple[int, int, RequestRecord]] = []
        self.step_count = 0
        self._sum_prompt = 0  # over decoding sequences
        self._sum_start_step = 0  # step_count at each decoding sequence's first token
        self.activity = Activity.IDLE
        self.activity_start_s = now_s
        self.step_latency_s = 0.0
        self.steps_planned = 0
        self.version = 0
        # Admitted requests still prefilling: [record, prompt tokens left], in order.
        self.prefill_queue: deque[list[Any]] = deque()
        self._prefill_tokens = 0  # prompt tokens left in the prefill queue
        self.chunk: list[tuple[RequestRecord, int]] = []  # what the current step prefills
        self.step_decoding = 0  # sequences the current step decodes
        self.chunk_tokens = 1 << 30  # prompt tokens a step may prefill; the cluster's budget until set
        self.dynamic_w = 0.0
        # The share of its GPUs' effective HBM bandwidth the current step draws on average (0 when
        # idle): what it costs co-residents' memory-bound steps (HbmModel).
        self.hbm_load = 0.0
        self.migration_of: int | None = None  # the instance this one replaces, while loading
        self.replaced_by: int | None = None
        # A share restart (see the module docstring): the instance this one restarts at another
        # share, until that one is gone, and on the old one its replacement.
        self.restart_of: int | None = None
        self.restarted_by: int | None = None
        self.share_restart = False  # it loads as a share restart (host memory, its own energy part)
        self.waits_for_memory = False  # a replacement that loads once the old one has freed its memory
        # What it counts in its GPUs' sm_pct_allocated and memory_fraction_allocated: its own share
        # and fraction, less while it is the replacement of a restart (see the module docstring).
        self.sm_pct_reserved = sm_pct
        self.memory_fraction_reserved = memory_fraction
        self.pending_batch_cap: int | None = None

    # -- InstanceView ---------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._decoding) + len(self.prefill_queue)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def pending_prompt_tokens(self) -> int:
        return self.queue.prompt_tokens + self._prefill_tokens

    @property
    def arrival_rate_per_s(self) -> float:
        return self._rate.last_rate_per_s

    def note_arrival(self, now_s: float) -> None:
        self._rate.note(now_s)

    def inherit_rate(self, other: SimInstance) -> None:
        """Take ``other``'s arrival-rate estimate (a share restart's replacement serves its traffic)."""
        self._rate = other._rate.copy()

    @property
    def holds_work(self) -> bool:
        return bool(self.queue or self._decoding or self.prefill_queue)

    # -- serving ---------------------------------------------------------------------------------

    def admit(self) -> None:
        """Move waiting requests into the prefill queue: FIFO, within batch cap and KV room."""
        room = self.batch_cap - self.running
        admitted = 0
        while self.queue and admitted < room:
            r = self.queue[0].request
            need = r.prompt_tokens + r.output_tokens
            if self.kv_tokens_reserved + need > self.kv_capacity_tokens and (admitted or self.running):
                break  # wait for room; a lone request too big for the cache runs anyway (truncated by vLLM)
            record = self.queue.popleft()
            self.prefill_queue.append([record, r.prompt_tokens])
            self._prefill_tokens += r.prompt_tokens
            self.kv_tokens_reserved += need
            admitted += 1

    def take_chunk(self, tokens: int) -> list[tuple[RequestRecord, int]]:
        """The next ``tokens`` prompt tokens to prefill, across the prefill queue in order."""
        chunk = []
        for entry in self.prefill_queue:
            if tokens <= 0:
                break
            take = min(tokens, entry[1])
            chunk.append((entry[0], take))
            tokens -= take
        return chunk

    def finish_chunk(self) -> list[RequestRecord]:
        """Account the current step's chunk; the requests whose prefill it completed."""
        done = []
        for _, take in self.chunk:
            entry = self.prefill_queue[0]
            entry[1] -= take
            self._prefill_tokens -= take
            if entry[1] <= 0:
                self.prefill_queue.popleft()
                done.append(entry[0])
        self.chunk = []
        return done

    def start_decoding(self, records: Iterable[RequestRecord], now_s: float) -> list[RequestRecord]:
        """Prefilled requests join the decode batch; those with one output token are done now."""
        finished = []
        for record in records:
            record.first_token_s = now_s
            r = record.request
            if r.output_tokens <= 1:
                record.finish_s = now_s
                self.kv_tokens_reserved -= r.prompt_tokens + r.output_tokens
                finished.append(record)
                continue
            heapq.heappush(self._decoding, (self.step_count + r.output_tokens - 1, r.id, record))
            self._sum_prompt += r.prompt_tokens
            self._sum_start_step += self.step_count
        return finished

    @property
    def decoding(self) -> int:
        return len(self._decoding)

    def steps_to_next_finish(self) -> int:
        return self._decoding[0][0] - self.step_count

    def mean_context(self, extra_steps: float) -> float:
        n = len(self._decoding)
        return (self._sum_prompt + n * (self.step_count + extra_steps) - self._sum_start_step) / n

    def advance(self, steps: int, now_s: float) -> list[RequestRecord]:
        """Account ``steps`` decode steps; the sequences that finished."""
        self.step_count += steps
        finished = []
        while self._decoding and self._decoding[0][0] <= self.step_count:
            done_step, _, record = heapq.heappop(self._decoding)
            r = record.request
            record.finish_s = now_s
            self._sum_prompt -= r.prompt_tokens
            self._sum_start_step -= done_step - (r.output_tokens - 1)
            self.kv_tokens_reserved -= r.prompt_tokens + r.output_tokens
            finished.append(record)
        return finished

    def take_queue(self) -> list[RequestRecord]:
        queue = list(self.queue)
        self.queue.clear()
        return queue
