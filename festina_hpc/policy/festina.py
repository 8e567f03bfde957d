"""``festina``: energy-first placement, phase-aware local control and SLO-aware consolidation.

Festina (arXiv 2606.30391) makes three coordinated decisions, all from
constant-time profile lookups:

- **Placement** (``place``): a request goes to the SLO-safe instance of its
  model where it adds the least energy. A busier instance runs a bigger batch
  at a lower energy per token, so among safe instances the fullest wins
  (packing, where a load balancer would spread). Only a small candidate set is
  looked at: the model's current fill target, three sampled instances and the
  newest one, then at most 16 before paying a cold start. When none is safe,
  a ready queue that serves the request sooner than a cold start takes it (and
  ``scale`` adds the missing instance); otherwise an instance starts where its
  marginal energy, cold start included, is least: co-located on a powered GPU
  with memory and SM headroom (best fit), else on empty GPUs of a node that is
  on (the fewest that fit, serving nodes first), else a node is woken (a start
  that waits for a node's wake yields to any instance that serves sooner, a
  loading one on a waking node included: it is never called safe). Where
  there is headroom is indexed on scale ticks (``Headroom``), so a start too
  looks at a few candidates whatever the cluster's size. Safe means
  the request's predicted TTFT (its queue ahead in chunks, at the settings the
  controller can give: max clock and the GPU's free share, or the instance's
  own share where a share changes only by a restart) is within its own
  SLO, and the decode steps within the TBT SLO's margin. On a full cluster, a
  model that keeps missing takes the GPUs of an idle instance of a model that
  has room elsewhere (capacity follows the load); a model with no instance
  takes an idle instance of a model that keeps another, or a quiet model's
  last. ``scale`` deploys every model once at its first tick, where whole GPUs
  hold them all, and adds an instance only for a shortage that lasts
  SCALE_OUT_AFTER_S: a moment's queue is served sooner by the ready instances
  than by a cold start.
- **Burst capacity** (``scale``): prompts come in bursts (in the code trace,
  one request in ten comes with 20x the mean rate within a TTFT SLO), and a
  burst that meets too few instances queues past every TTFT SLO long before a
  cold start helps. Each model's recent bursts (the prompt tokens that arrived
  within one TTFT SLO before each request, ``BurstMeter``) set how many
  instances it keeps: added greedily across models where one more instance
  drains the most requests' bursts in time per GPU it holds, until
  BURST_ATTAINMENT of them are.
- **Local control** (``control``): per GPU, the joint choice of the one clock
  and each co-resident instance's SM share and prefill chunk that draws the
  least power while every instance keeps its SLO with a margin: TBT from a
  decode step at its batch (stretched by prefill interruptions, and, where
  requests of a few tokens meet prefills often, the step that carries a
  prefill chunk: then the chunk shrinks), TTFT from the queued prompt tokens
  in chunks, so a prefill burst raises clock or share within one tick and
  decode-only GPUs run slow. Exact over the table's clocks and SM shares in
  steps of 10%: for each clock, the least share per instance by bisection;
  cost O(clocks x instances x log shares) lookups. Where no setting keeps
  every SLO, the GPU runs flat out, the instances that can keep theirs get
  their least shares, and every chunk keeps TBT where it can (a long chunk
  spoils a token of every sequence decoding; a queue, only those waiting).
  Hysteresis: lower the clock only by two or more table steps, change a share
  only by 10 points or more, raise at once when a target would be missed.
  That joint choice holds where a site's engine can change a running
  instance's share (``live_share_change``). MPS cannot: a client's share is
  fixed when its CUDA context is created, and a different share is a new
  instance (a share restart: a reload from host memory, the old one serving
  meanwhile). There the controller solves the clock and chunks at the shares
  the instances have (``solve_at``) and restarts an instance at another share
  only (a) to grow one that no clock keeps within its SLOs at its share, into
  its GPUs' free SMs, or (b) to shrink one whose needed share (the least that
  keeps its SLOs at full clock) has stayed SHRINK_GAP_PCT below its own for
  SHARE_SETTLE_S, to the most it needed meanwhile; each place (a model on its
  GPUs, a replacement included) at most once per SHARE_SETTLE_S, and never
  while a restart there is under way (``_restarts``). An instance started on
  a whole GPU thus keeps all of it until it has needed far less for that
  long, and co-location waits for the room.
- **Consolidation** (``consolidate``): every period, the least-loaded powered
  node (or, when it cannot be, the next least loaded) is evacuated when every
  instance on it fits elsewhere on powered nodes with every co-resident still
  meeting its SLO (the control solver is the check) and the static and idle
  energy saved over a horizon exceeds the migrations' cold starts; instances
  idle for QUIET_KEEP_ALIVES keep-alives are stopped rather than moved (a
  model is scaled to zero only where that lets a node go off: elsewhere its
  instance holds no energy, and stopping it costs its next request a cold
  start). Nodes empty for as long as waking one takes (ski rental: by then
  staying on has cost what a wake costs) are powered off while a headroom of
  empty GPUs (SPARE_SHARE of those in use) stays powered, and a node is woken
  when the headroom runs low. ``scale`` stops extra instances idle for
  SCALE_IN_IDLE_S so that nodes can empty.

The ablation variants ``festina-placement`` (placement only: max clock, shares
as started, no consolidation) and ``festina-control`` (plus local control)
share this code.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from festina_hpc.cluster.figures import USABLE_MEMORY_FRAC
from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import (
    PREFILL_CHUNK_TOKENS,
    TBT_PLANNING,
    TTFT_CONTROL,
    TTFT_PLANNING,
    TokenStats,
    empty_gpus_on,
    sampled,
    serving,
)
from festina_hpc.policy.types import (
    Arrival,
    ClusterView,
    Drop,
    EndedRequest,
    GpuSettings,
    GpuView,
    InstancePhase,
    InstanceView,
    Migrate,
    ModelInfo,
    NodePower,
    NodeView,
    Placement,
    Plan,
    PowerOff,
    PowerOn,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.table import ProfileTable

# Planning headroom, the same for every policy (policy/common.py): placement holds a request's TTFT
# to TTFT_PLANNING of its SLO (the estimate is already a tail, a long prefill ahead), every decode
# step to TBT_PLANNING of the TBT SLO, and the controller a typical prompt to TTFT_CONTROL of it.
SHARES = tuple(range(10, 101, 10))  # SM shares the controller chooses from (MPS active-thread %)
# Prefill chunks the controller chooses from, largest first (the largest that keeps the SLOs wins).
# Smaller chunks shorten the steps that decoding sequences wait in, so the TBT tail is met at a lower
# clock; each prompt then takes more steps (more per-step overhead), which the TTFT check weighs.
CHUNKS = (PREFILL_CHUNK_TOKENS, 1024, 512)
MIN_START_SHARE = 30.0
ROOMY_SHARE = 50.0  # a co-located start with less SM share comes after an empty GPU (see _where_to_start)
WIDE_LOOK = 16  # instances looked at before starting a new one
TAIL_MISSES = 0.002  # share of requests meeting a chunk step among too few tokens, above which it is planned for
TARGET_SEQUENCES = 48  # KV room a new co-located instance reserves, in sequences of typical length
MEMORY_STEP = 0.05  # instances reserve memory in these steps of a GPU's, so fractions pack cleanly
CONSOLIDATION_HORIZON_S = 600.0  # savings must repay migrations within this time
EVACUATION_TRIES = 2  # least loaded nodes a consolidation tries to empty, in turn
SPARE_GPUS = 2  # powered empty GPUs kept for bursts at least; fewer wakes a node
SPARE_SHARE = 0.1  # and this share of the GPUs in use
SCALE_OUT_AFTER_S = 10.0  # a model lacking room this long (two scale ticks) gets another instance
QUIET_KEEP_ALIVES = 10  # an instance idle for this many keep-alives is quiet: stopped, not moved, when its node empties
SCALE_IN_IDLE_S = 300.0  # an extra instance idle this long is stopped (sooner churns cold starts)
BURST_MEMORY_S = 900.0  # the bursts that capacity is provisioned for are this recent
BURST_ATTAINMENT = 0.995  # share of requests whose burst the instances can drain in time
BURST_DRAIN_WINDOWS = 1.75  # a window's tokens are prefilled within this many windows (see _burst_instances)
PENDING_QUANTUM = 128  # queued prompt tokens are planned rounded up to this (memo keys stay few)
TYPICAL_DRIFT = 0.05  # relative move of a typical length that replaces the frozen one
MEMO_LIMIT = 200_000  # entries per memo before it starts over
# Share restarts (an MPS client's share is fixed at its start, see ``_restarts``): a share is given
# back only after the instance has needed SHRINK_GAP_PCT less for SHARE_SETTLE_S, and an instance
# (its model on its GPUs: a restart's replacement included) is restarted at most once per
# SHARE_SETTLE_S. 180 s is three half-lives of the arrival-rate estimates (RATE_HALF_LIFE_S, 60 s,
# in cluster/rate.py, kept alike by both drivers): a lull that short is still in the estimates, and the traces'
# bursts come and go within it, so a share given back sooner would be taken again by the next one.
SHARE_SETTLE_S = 180.0
SHRINK_GAP_PCT = 30.0  # a share is given back only where it is this far above what is needed


class BurstMeter:
    """A model's bursts: before each request, the prompt tokens that arrived within one window (the
    model's TTFT SLO), kept for the requests of the last BURST_MEMORY_S; what
    ``FestinaPolicy._burst_instances`` provisions prefill capacity for. O(1) per request."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        # Times and token counts in parallel deques of plain numbers, not of tuples: nothing the
        # garbage collector tracks is made per request (its passes would land on placements).
        self._window_s: deque[float] = deque()  # arrivals within the window
        self._window_tokens: deque[int] = deque()  # and their prompt tokens
        self._tokens = 0  # summed
        self._seen_s: deque[float] = deque()  # arrivals of the last BURST_MEMORY_S
        self._seen_tokens: deque[int] = deque()  # the tokens in the window before each
        self._sorted: np.ndarray | None = None

    def observe(self, now_s: float, prompt_tokens: int) -> None:
        self._window_s.append(now_s)
        self._window_tokens.append(prompt_tokens)
        self._tokens += prompt_tokens
        while self._window_s[0] < now_s - self.window_s:
            self._window_s.popleft()
            self._tokens -= self._window_tokens.popleft()
        self._seen_s.append(now_s)
        self._seen_tokens.append(self._tokens)
        self._sorted = None

    def bursts(self, now_s: float) -> np.ndarray:
        """The window sums of the requests of the last BURST_MEMORY_S, sorted."""
        while self._seen_s and self._seen_s[0] < now_s - BURST_MEMORY_S:
            self._seen_s.popleft()
            self._seen_tokens.popleft()
            self._sorted = None
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self._seen_tokens, dtype=float))
        return self._sorted


@dataclass(frozen=True)
class Solution:
    """The local controller's answer for one GPU."""

    clock_mhz: int
    sm_pct: dict[int, float]  # instance id -> SM share
    chunk_tokens: dict[int, int]  # instance id -> prefill chunk


@dataclass(slots=True)
class Load:
    """What the controller plans for: an instance's model, batch, queue and arrival rate (a value:
    not changed once made; not frozen, which would make every one built cost twice as much).

    The queue is rounded up to PENDING_QUANTUM tokens, and the batch and rate up to a grid of
    eight steps per doubling (of 1 sequence and 0.1 per second below eight of them): the estimates
    are memoised on these, and rounding up keeps them on the safe side."""

    instance_id: int
    model: str
    batch: int  # sequences it runs (admitted plus queued)
    pending_tokens: int  # prompt tokens to prefill before a new request's first token, its own included
    rate_per_s: float

    def __post_init__(self) -> None:
        self.pending_tokens = -(-self.pending_tokens // PENDING_QUANTUM) * PENDING_QUANTUM
        self.batch = int(_ceil_to_grid(self.batch, 1))
        self.rate_per_s = _ceil_to_grid(self.rate_per_s, 0.1)


def _ceil_to_grid(value: float, step: float) -> float:
    """``value`` rounded up to a multiple of ``step`` up to 8 steps, then to eight steps per
    doubling (at most 12.5% up)."""
    if value > 8 * step:
        step *= 2 ** math.floor(math.log2(value / (8 * step)))
    return math.ceil(round(value / step, 6)) * step


@dataclass(frozen=True)
class Typical:
    """A model's request lengths as the estimates plan with them."""

    prompt_tokens: float  # mean
    long_prompt_tokens: float  # p90
    output_tokens: float  # mean
    short_output_share: float  # of requests too short to average a prefill step away

    @classmethod
    def of(cls, stats: TokenStats, model: str) -> Typical:
        return cls(stats.prompt_tokens(model), stats.prompt_quantile(model, 0.9), stats.output_tokens(model),
                   stats.short_output_share(model))

    @property
    def decode_context_tokens(self) -> float:
        """Mean KV context of a decoding sequence: its prompt plus half its output."""
        return self.prompt_tokens + self.output_tokens / 2

    def drifted_from(self, other: Typical) -> bool:
        return (any(abs(a - b) > TYPICAL_DRIFT * b for a, b in (
            (self.prompt_tokens, other.prompt_tokens), (self.long_prompt_tokens, other.long_prompt_tokens),
            (self.output_tokens, other.output_tokens)))
            or abs(self.short_output_share - other.short_output_share) > TYPICAL_DRIFT)


@dataclass(frozen=True)
class GpuRoom:
    """A GPU as a consolidation plan sees it: what its residents and the plan's moves leave."""

    memory_free: float  # fraction of the GPU's memory
    sm_pct_used: float  # SM shares held (residents now, and moves planned onto it)
    loads: tuple[Load, ...]  # what the control solver must keep within SLOs there


@dataclass
class Headroom:
    """Where new instances can go, as the last scale tick saw the cluster, indexed so that a start
    looks at a few candidates instead of the whole cluster: GPUs with room for a co-resident by
    the memory they have free, and powered nodes by how many empty GPUs they have. Every
    candidate is checked against the live cluster when used (a change since rules it out), and
    the starts made between ticks are added as they are made."""

    shared: dict[int, list[int]]  # free memory in MEMORY_STEPs -> GPUs holding instances with room for another
    open_nodes: dict[int, list[int]]  # empty GPUs -> nodes that are on (serving ones first, most loaded first)
    waking_nodes: list[int]
    off_nodes: list[int]

    @classmethod
    def of(cls, view: ClusterView) -> Headroom:
        """The cluster's headroom now: one look over every instance and node (on scale ticks)."""
        counts: dict[int, int] = {}
        for inst in view.instances():
            counts[inst.node] = counts.get(inst.node, 0) + 1
        on = sorted((n.id for n in view.nodes() if n.power is NodePower.ON), key=lambda n: -counts.get(n, 0))
        room = cls({}, {}, [n.id for n in view.nodes() if n.power is NodePower.WAKING],
                   [n.id for n in view.nodes() if n.power is NodePower.OFF])
        for node in on:
            empty = 0
            for g in view.node(node).gpus:
                gpu = view.gpu(g)
                if not gpu.instances:
                    empty += 1
                elif 100.0 - gpu.sm_pct_allocated >= MIN_START_SHARE:
                    room.shared.setdefault(_memory_steps(1.0 - gpu.memory_fraction_allocated), []).append(g)
            if empty:
                room.open_nodes.setdefault(empty, []).append(node)
        return room

    def colocation(self, view: ClusterView, model: str, fraction: float, taken: Collection[int],
                   least_share: float = MIN_START_SHARE) -> tuple[int, float] | None:
        """The GPU (holding instances of other models, ``least_share`` of its SMs free) left with
        the least free memory once ``fraction`` of it is taken (best fit), and the SM share it has
        free; None for an instance that takes its GPUs whole (``fraction`` 1). Not beside the
        model's own instance: a second one there adds no compute that the first could not take by
        growing its share."""
        if fraction >= 1.0:
            return None
        for steps in range(_memory_steps(fraction), round(1 / MEMORY_STEP) + 1):
            for g in self.shared.get(steps, ()):
                gpu = view.gpu(g)
                sm_free = 100.0 - gpu.sm_pct_allocated
                if (gpu.instances and g not in taken and view.node(gpu.node).power is NodePower.ON
                        and _fits_beside(1.0 - gpu.memory_fraction_allocated, sm_free, fraction, least_share)
                        and all(view.instance(i).model != model for i in gpu.instances)):
                    return g, sm_free
        return None

    def empty_gpus(self, view: ClusterView, tp: int, taken: Collection[int]) -> tuple[int, ...] | None:
        """``tp`` empty GPUs on one powered node: of the nodes that are on, one with the fewest
        empty GPUs that fit (serving nodes first), else a waking one."""
        for count in range(tp, max(self.open_nodes, default=0) + 1):
            for node in self.open_nodes.get(count, ()):
                if view.node(node).power is NodePower.ON:
                    free = empty_gpus_on(view, node, taken)
                    if len(free) >= tp:
                        return tuple(free[:tp])
        for node in self.waking_nodes:
            free = empty_gpus_on(view, node, taken)
            if view.node(node).power is NodePower.WAKING and len(free) >= tp:
                return tuple(free[:tp])
        return None

    def off_node(self, view: ClusterView, taken: Collection[int]) -> NodeView | None:
        """A node that is off, to wake."""
        return next((view.node(n) for n in self.off_nodes if view.node(n).power is NodePower.OFF
                     and not any(g in taken for g in view.node(n).gpus)), None)

    def note_start(self, view: ClusterView, start: StartInstance) -> None:
        """What a start made between ticks leaves: room beside it, or fewer empty GPUs on its node."""
        gpu = view.gpu(start.gpus[0])
        if gpu.instances:
            left = 1.0 - gpu.memory_fraction_allocated - start.memory_fraction
            self.shared.setdefault(_memory_steps(left), []).append(gpu.id)
        else:
            empty = len(empty_gpus_on(view, gpu.node)) - len(start.gpus)
            if empty:
                self.open_nodes.setdefault(empty, []).insert(0, gpu.node)
            if start.memory_fraction < 1.0:
                self.shared.setdefault(_memory_steps(1.0 - start.memory_fraction), []).append(gpu.id)


def _fits_beside(memory_free: float, sm_free: float, fraction: float,
                 least_share: float = MIN_START_SHARE) -> bool:
    """Whether a GPU with this memory and SM share free takes a new instance of ``fraction``
    starting with ``least_share`` of its SMs at least."""
    return memory_free + 1e-9 >= fraction and sm_free >= least_share


def _memory_steps(fraction: float) -> int:
    """A memory fraction in whole MEMORY_STEPs, rounded down."""
    return math.floor(fraction / MEMORY_STEP + 1e-9)


@dataclass(frozen=True)
class StepTimes:
    """A model's step times at one SM share and clock for its typical lengths, read off its profile
    once (``FestinaPolicy._read_step_times``): every SLO estimate is then list indexing.

    The table is multilinear, so along one axis it is piecewise linear between grid points: lookups
    at the batch (and prompt-length) grid points and a linear interpolation between them give the
    lookup's own answer at every batch (and length)."""

    decode_s: list[float]  # a decode step at the typical context, by batch - 1 (up to the table's largest)
    decode_power_w: list[float]  # board power while it runs, likewise
    prefill_s: list[float]  # prefill of k * PENDING_QUANTUM prompt tokens, by k, up to the largest chunk
    typical_prefill_s: float  # of the typical (mean) prompt
    long_prefill_s: tuple[float, ...]  # of the long (p90) prompt's first chunk, per chunk of CHUNKS

    def decode_step_s(self, batch: int) -> float:
        return self.decode_s[min(max(batch, 1), len(self.decode_s)) - 1]

    def decode_step_power_w(self, batch: int) -> float:
        return self.decode_power_w[min(max(batch, 1), len(self.decode_power_w)) - 1]


@dataclass(frozen=True)
class Speeds:
    """What a load of one (model, batch, arrival rate) gets at one SM share and clock: every
    input of its SLO checks but the queue, per prefill chunk of CHUNKS (see ``_speeds_at``)."""

    tbt_mean_s: float  # time between tokens, on average
    tbt_tail_s: tuple[float, ...]  # and at the tail (a step carrying a long prompt's chunk)
    chunk_step_s: tuple[float, ...]  # a step that prefills a whole chunk while decoding the batch
    extra_s: float  # what decoding the batch adds to a prefill step
    arrival_s: tuple[float, ...]  # the step a new request may arrive during (0 when prefills are rare)
    steps: StepTimes  # at the same share and clock (what a queue's last partial chunk takes)


@register
class FestinaPolicy(Policy):
    """Placement, local control and consolidation; the flags switch the last two for the ablation."""

    name = "festina"
    scale_period_s = 5.0
    consolidate_period_s = 30.0
    uses_control = True
    uses_consolidation = True

    def __init__(self, context: PolicyContext):
        super().__init__(context)
        self.stats = TokenStats()
        self._fill: dict[str, int] = {}  # model -> the instance being filled
        self._bursts: dict[str, BurstMeter] = {}
        self._clocks = sorted(self.gpu_spec.table_clocks_mhz)
        self._tables: dict[str, ProfileTable] = {}
        self._typicals: dict[str, Typical] = {}
        self._step_times: dict[str, dict[tuple[float, int], StepTimes]] = {}  # per model, by (share, clock)
        self._speeds: dict[str, dict[tuple[int, float, float, int], Speeds]] = {}  # per model
        self._fastest: dict[str, float] = {}  # model -> least prefill seconds per prompt token
        self._empty_since: dict[int, float] = {}  # node -> since when it holds no instance
        self._headroom: Headroom | None = None  # rebuilt on every scale tick
        self._short: set[str] = set()  # models that placement found without a safe instance
        self._pressed_since: dict[str, float] = {}  # model -> since when it lacks room (short or no spare)
        self._deployed = False  # every model got its first instance (at the first scale tick)
        self._restarted_s: dict[tuple[str, tuple[int, ...]], float] = {}  # (model, GPUs) -> last share restart
        self._low_since: dict[int, tuple[float, float]] = {}  # instance -> (since when, most) it needs far less

    # -- profile lookups --------------------------------------------------------------------------
    # Estimates are memoised. They depend on few distinct points: integer batches, the
    # controller's shares and the table's clocks, arrival rates in steps of 0.1/s, each model's
    # typical lengths (frozen between refreshes, see ``_refresh_typical``) and queues rounded up to
    # PENDING_QUANTUM tokens. A model's profile is read once per share and clock (``StepTimes``),
    # everything but the queue is one ``Speeds`` entry built from it by arithmetic, and the queue
    # enters by arithmetic too, so an SLO check is a few dictionary hits whatever the cluster's size.

    def _table(self, model: str) -> ProfileTable:
        table = self._tables.get(model)
        if table is None:
            table = self._tables[model] = self.store.table(self.context.gpu_type, model)
        return table

    def _typical(self, model: str) -> Typical:
        """The model's request lengths the estimates plan with (frozen between refreshes)."""
        typical = self._typicals.get(model)
        return typical if typical is not None else self._plan_with(model, Typical.of(self.stats, model))

    def _refresh_typical(self) -> None:
        """Take a model's learnt lengths when one has moved by TYPICAL_DRIFT or more (on scale
        ticks: off the request path). Small drifts keep the estimates and their hits."""
        for model, typical in list(self._typicals.items()):
            fresh = Typical.of(self.stats, model)
            if fresh.drifted_from(typical):
                self._plan_with(model, fresh)

    def _plan_with(self, model: str, typical: Typical) -> Typical:
        """Plan the model's estimates with ``typical`` from now on: they start over, and its step
        times at full clock (what placement reads, at every share) are read at once."""
        self._typicals[model] = typical
        self._speeds.pop(model, None)
        self._step_times[model] = {}
        for share in SHARES:
            self._steps(model, float(share), self.gpu_spec.max_clock_mhz)
        return typical

    def _steps(self, model: str, sm_pct: float, clock_mhz: int) -> StepTimes:
        memo = self._step_times.setdefault(model, {})
        steps = memo.get((sm_pct, clock_mhz))
        if steps is None:
            steps = memo[sm_pct, clock_mhz] = self._read_step_times(self._table(model), self._typical(model),
                                                                    sm_pct, clock_mhz)
        return steps

    @staticmethod
    def _read_step_times(table: ProfileTable, typical: Typical, sm_pct: float, clock_mhz: int) -> StepTimes:
        """``StepTimes`` from one lookup per batch and prompt-length grid point (see there)."""
        batches, lengths = table.axes[0], table.axes[1]
        decode = [table.lookup("decode", b, typical.decode_context_tokens, sm_pct, clock_mhz, clamp=True)
                  for b in batches]
        every_batch = np.arange(1, int(batches[-1]) + 1)
        prefill = [table.lookup("prefill", 1, n, sm_pct, clock_mhz, clamp=True).latency_s for n in lengths]
        quanta = np.arange(0, CHUNKS[0] + 1, PENDING_QUANTUM)
        long_prompts = [min(typical.long_prompt_tokens, chunk) for chunk in CHUNKS]
        return StepTimes(
            decode_s=np.interp(every_batch, batches, [d.latency_s for d in decode]).tolist(),
            decode_power_w=np.interp(every_batch, batches, [d.power_w for d in decode]).tolist(),
            prefill_s=np.interp(quanta, lengths, prefill).tolist(),
            typical_prefill_s=float(np.interp(typical.prompt_tokens, lengths, prefill)),
            long_prefill_s=tuple(np.interp(long_prompts, lengths, prefill).tolist()))

    def _speeds_of(self, view: ClusterView, load: Load, sm_pct: float, clock_mhz: int) -> Speeds:
        memo = self._speeds.setdefault(load.model, {})
        key = (load.batch, load.rate_per_s, sm_pct, clock_mhz)
        speeds = memo.get(key)
        if speeds is None:
            if len(memo) >= MEMO_LIMIT:
                memo.clear()
            speeds = memo[key] = self._speeds_at(self._steps(load.model, sm_pct, clock_mhz), load)
        return speeds

    def _speeds_at(self, steps: StepTimes, load: Load) -> Speeds:
        """The load's step times at one share and clock (those of ``steps``), for each of CHUNKS.

        Time between tokens: decode steps stretched by the prefills interleaved with them (busy
        share r x p). A request of a few tokens (SHORT_OUTPUT_TOKENS or fewer) averages nothing
        away: one step that carries a chunk (of a long, p90, prompt) among its few spoils its TBT.
        Where such requests meet prefills often enough (short share x busy share of TAIL_MISSES or
        more), that step is the TBT tail to plan for.

        Time to first token (``Speeds.ttft_s``): every prompt token ahead of a new request and its
        own, in chunks, each step also decoding the batch (what the batch adds over a batch of
        one), after the step running when it arrives (a chunk of a long prompt) when prefills keep
        the instance busy often enough (1% of the time) to matter at the p99."""
        step_s = steps.decode_step_s(load.batch)
        busy = load.rate_per_s * steps.typical_prefill_s
        extra_s = max(0.0, step_s - steps.decode_s[0]) if load.batch > 1 else 0.0
        tail = busy * self._typical(load.model).short_output_share >= TAIL_MISSES
        tails, chunk_steps, arrivals = [], [], []
        for chunk, long_s in zip(CHUNKS, steps.long_prefill_s):
            tails.append(step_s + long_s if tail else 0.0)
            chunk_steps.append(steps.prefill_s[chunk // PENDING_QUANTUM] + extra_s)
            arrivals.append(long_s if busy >= 0.01 else 0.0)
        mean_s = step_s / max(0.05, 1.0 - busy)
        return Speeds(mean_s, tuple(max(mean_s, t) for t in tails), tuple(chunk_steps), extra_s, tuple(arrivals),
                      steps)

    def _ttft_s(self, speeds: Speeds, pending_tokens: int, chunk_index: int) -> float:
        full, rest = divmod(max(1, pending_tokens), CHUNKS[chunk_index])
        ttft_s = full * speeds.chunk_step_s[chunk_index] + speeds.arrival_s[chunk_index]
        if rest:
            ttft_s += speeds.steps.prefill_s[-(-rest // PENDING_QUANTUM)] + speeds.extra_s
        return ttft_s

    def _meets_slo(self, view: ClusterView, load: Load, sm_pct: float, clock_mhz: int,
                   ttft_slo_s: float | None = None) -> bool:
        """Whether the load keeps its SLOs at this share and clock with some prefill chunk."""
        return self._chunk_for(view, load, sm_pct, clock_mhz, ttft_slo_s) is not None

    def _chunk_for(self, view: ClusterView, load: Load, sm_pct: float, clock_mhz: int,
                   ttft_slo_s: float | None = None) -> int | None:
        """The largest prefill chunk with which the load keeps its SLOs at this share and clock, or
        None. Smaller chunks shorten the steps decoding sequences wait in, at the cost of more
        steps (more per-step overhead) for every prompt.

        ``ttft_slo_s`` is a placement question: the TTFT SLO that must hold for the request being
        placed (or a typical one), at the settings asked about. Without it, the controller's
        question: the SLO of the typical prompt that the load adds to its queue, with its margin,
        or full speed where even full speed misses it."""
        limit_s = TBT_PLANNING * view.model(load.model).slo.tbt_s
        full = self._speeds_of(view, load, 100.0, self.gpu_spec.max_clock_mhz)
        speeds = self._speeds_of(view, load, sm_pct, clock_mhz)
        if ttft_slo_s is None:
            ttft_slo_s = self._control_ttft_s(view, load)
        # The tail counts only where full speed can meet it with the smallest chunk: where it
        # cannot, the few-token requests behind a chunk miss at any setting, and the rest need
        # only the mean.
        tail_counts = full.tbt_tail_s[-1] <= limit_s
        for i, chunk in enumerate(CHUNKS):
            step_s = speeds.tbt_tail_s[i] if tail_counts else speeds.tbt_mean_s
            if step_s <= limit_s and self._ttft_s(speeds, load.pending_tokens, i) <= ttft_slo_s:
                return chunk
        return None

    def _control_ttft_s(self, view: ClusterView, load: Load) -> float:
        """The TTFT the controller holds a load to: its typical prompt's SLO with a margin, or the
        best any setting gives (the engine's chunk at full speed) where that misses it anyway."""
        floor_s = self._ttft_s(self._speeds_of(view, load, 100.0, self.gpu_spec.max_clock_mhz), load.pending_tokens, 0)
        return max(TTFT_CONTROL * self._typical_ttft_slo_s(view, load.model), floor_s * (1 + 1e-9))

    def _typical_ttft_slo_s(self, view: ClusterView, model: str) -> float:
        """The TTFT SLO of the model's typical prompt (SLOs grow with the prompt's length)."""
        return view.model(model).slo.ttft_for(int(self._typical(model).prompt_tokens))

    # -- placement --------------------------------------------------------------------------------

    def feedback(self, done: Sequence[EndedRequest]) -> None:
        # Output lengths are learnt here, from what the requests generated; the estimates take them at
        # the next scale tick that finds them drifted (_refresh_typical).
        self.stats.learn(done)

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        self.stats.observe_prompt(request.model, request.prompt_tokens)
        model = view.model(request.model)
        burst = self._bursts.get(model.name)
        if burst is None:
            burst = self._bursts[model.name] = BurstMeter(model.slo.ttft_s)
        burst.observe(view.now_s, request.prompt_tokens)
        instances = view.instances_of(request.model)
        looked = self._looked_at(request, view, instances)
        target = self._safe_fullest(request, view, model, looked)
        if target is None and len(instances) > 4:
            # Before paying a cold start, a bounded wider look (the newest first: they have room).
            seen = {i.id for i in looked}
            target = self._safe_fullest(request, view, model,
                                        [i for i in instances[-1:-WIDE_LOOK - 1:-1] if i.id not in seen])
        if target is not None:
            self._fill[request.model] = target.id
            return Route(target.id)
        fallback = self._sooner_than(request, view, looked, self._load_s(model))
        if fallback is not None:
            self._short.add(request.model)  # scale() adds the instance it lacks, off the request's path
            return Route(fallback.id)
        start = self._where_to_start(view, model)
        node_wait_s = self._node_wait_s(view, view.gpu(start.gpus[0]).node) if start is not None else 0.0
        if node_wait_s:
            # The start waits for a node: an instance that serves sooner takes the request (and
            # scale() wakes the node for the capacity), rather than each request waking another.
            sooner = self._sooner_than(request, view, looked, node_wait_s + self._load_s(model))
            if sooner is not None:
                self._short.add(request.model)
                return Route(sooner.id)
        if start is not None:
            self._room(view).note_start(view, start)
            return start
        candidates = serving(instances)
        if candidates:  # nowhere to grow: the least bad instance rather than a drop
            self._short.add(request.model)  # scale() may free room by evicting an idle instance
            return Route(min(candidates, key=lambda i: (i.running + i.waiting) / i.batch_cap).id)
        # No instance at all on a full cluster: an idle one of a model with room makes way now
        # (scale() only grows models that have an instance).
        evicting = self._by_eviction(view, model, set(), self._burst_instances(view))
        return evicting if evicting is not None else Drop("no capacity for a new instance")

    def _sooner_than(self, request: Arrival, view: ClusterView, looked: Sequence[InstanceView],
                     wait_s: float) -> InstanceView | None:
        """The instance ``looked`` at that serves the request soonest, if sooner than ``wait_s`` (what
        a new instance would wait): a request never waits for a cold start it need not wait for.
        Of the ready ones, the least queued serves soonest; a loading one on a waking node serves
        after the wake and its load (one on a node that is on serves as soon as a new instance)."""
        best: InstanceView | None = None
        ready = [i for i in looked if i.phase is InstancePhase.READY]
        queued = min(ready, key=lambda i: i.pending_prompt_tokens, default=None)
        if queued is not None:
            load = Load(queued.id, queued.model, queued.running + queued.waiting + 1,
                        queued.pending_prompt_tokens + request.prompt_tokens, queued.arrival_rate_per_s)
            serves_in_s = self._ttft_s(self._speeds_of(view, load, 100.0, self.gpu_spec.max_clock_mhz),
                                       load.pending_tokens, 0)
            if serves_in_s < wait_s:
                best, wait_s = queued, serves_in_s
        for inst in looked:
            if self._waits_for_its_node(view, inst):
                serves_in_s = self._node_wait_s(view, inst.node) + self._load_s(view.model(inst.model))
                if serves_in_s <= wait_s:  # as soon as a new instance: this one holds no new GPUs
                    best, wait_s = inst, serves_in_s
        return best

    @staticmethod
    def _waits_for_its_node(view: ClusterView, inst: InstanceView) -> bool:
        """A loading instance whose node is not on yet: it serves after the wake, not a load."""
        return inst.phase is InstancePhase.LOADING and view.node(inst.node).power is not NodePower.ON

    def _node_wait_s(self, view: ClusterView, node_id: int) -> float:
        """Until a node serves: nothing for one that is on, the rest of a wake for a waking one."""
        node = view.node(node_id)
        if node.power is NodePower.ON:
            return 0.0
        if node.power is NodePower.WAKING and math.isfinite(node.ready_at_s):
            return max(0.0, node.ready_at_s - view.now_s)
        return self.context.resume_time_s

    def _looked_at(self, request: Arrival, view: ClusterView,
                   instances: Sequence[InstanceView]) -> list[InstanceView]:
        """The fill target, three sampled instances and the newest: O(1) of the model's instances."""
        looked: dict[int, InstanceView] = {}
        fill = self._fill.get(request.model)
        if fill is not None:
            try:
                looked[fill] = view.instance(fill)
            except KeyError:
                del self._fill[request.model]
        for inst in sampled(instances, request.id, count=3):
            looked[inst.id] = inst
        if instances:
            looked[instances[-1].id] = instances[-1]
        return [i for i in looked.values() if i.phase <= InstancePhase.READY]

    def _safe_fullest(self, request: Arrival, view: ClusterView, model: ModelInfo,
                      candidates: Sequence[InstanceView]) -> InstanceView | None:
        """The fullest candidate that takes the request within its SLOs and KV room. Candidates are
        tried fullest first, so the SLO check (the costly part) runs until the first safe one."""
        need = request.prompt_tokens + self._typical(request.model).output_tokens
        ttft_slo_s = TTFT_PLANNING * model.slo.ttft_for(request.prompt_tokens)
        longest_queue = ttft_slo_s / self._fastest_s_per_token(view, request.model)
        # The cheap checks first (KV room, and a queue that full speed cannot prefill within the
        # SLO), then the SLO check on what pass them, fullest first.
        open_: list[tuple[float, int, int, InstanceView]] = []
        for inst in candidates:
            if inst.phase > InstancePhase.READY:
                continue
            if self._waits_for_its_node(view, inst):
                continue  # minutes of a wake, not a load's seconds
            waiting = inst.waiting
            pending = inst.pending_prompt_tokens + request.prompt_tokens
            if inst.kv_tokens_reserved + (waiting + 1) * need > inst.kv_capacity_tokens or pending > longest_queue:
                continue
            open_.append((self._fullness(inst), inst.running + waiting + 1, pending, inst))
        open_.sort(key=lambda entry: entry[0], reverse=True)
        clock = self.gpu_spec.max_clock_mhz
        for _, batch, pending, inst in open_:
            load = Load(inst.id, inst.model, batch, pending, inst.arrival_rate_per_s)
            if self._meets_slo(view, load, self._reachable_share(view, inst), clock, ttft_slo_s):
                return inst
        return None

    def _reachable_share(self, view: ClusterView, inst: InstanceView) -> float:
        """The SM share the controller can give the instance: its own and what its GPU has free;
        its own only where a share changes by a restart (the request would not wait for one)."""
        if not self.context.live_share_change:
            share = inst.sm_pct
        else:
            share = min(100.0, inst.sm_pct + max(0.0, 100.0 - view.gpu(inst.gpus[0]).sm_pct_allocated))
        return max(SHARES[0], share - share % SHARES[0])  # down to the controller's grid (memo keys stay few)

    def _fastest_s_per_token(self, view: ClusterView, model: str) -> float:
        """The least prefill time per prompt token any setting and chunk gives (full speed, the
        cheapest prompt length per token): a lower bound on any queue's prefill."""
        fastest = self._fastest.get(model)
        if fastest is None:
            prefill_s = self._steps(model, 100.0, self.gpu_spec.max_clock_mhz).prefill_s
            fastest = self._fastest[model] = min(s / (k * PENDING_QUANTUM) for k, s in enumerate(prefill_s) if k)
        return fastest

    @staticmethod
    def _fullness(inst: InstanceView) -> float:
        """Sequences per batch slot; a loading instance ranks below every ready one (it is taken
        only when no ready instance is safe: on a node that is on, its wait is a new instance's;
        one whose node is still waking is not called safe, see ``_sooner_than``)."""
        fullness = (inst.running + inst.waiting) / inst.batch_cap
        return fullness - 1.0 if inst.phase is InstancePhase.LOADING else fullness

    def _memory_fraction(self, view: ClusterView, model: ModelInfo) -> float:
        """Memory to reserve per GPU: weights plus KV for TARGET_SEQUENCES typical sequences.

        A tensor-parallel instance takes its GPUs whole: its SM share is one setting across
        several GPUs, which per-GPU control of co-residents could not keep consistent."""
        if model.tp > 1:
            return 1.0
        usable = self.gpu_spec.memory_bytes * USABLE_MEMORY_FRAC
        typical = self._typical(model.name)
        kv_tokens = TARGET_SEQUENCES * (typical.prompt_tokens + typical.output_tokens)
        need = (model.weights_bytes_per_gpu + kv_tokens * model.kv_bytes_per_token_per_gpu) / usable
        steps = round(1 / MEMORY_STEP)
        return min(1.0, math.ceil(need * steps) / steps)

    def _where_to_start(self, view: ClusterView, model: ModelInfo,
                        taken: frozenset[int] = frozenset()) -> StartInstance | None:
        """Where a new instance adds the least energy: beside another on a GPU with room, else on
        empty GPUs of a node that is on, else a node is woken (from ``Headroom``, a few candidates
        whatever the cluster's size). A model's first instance takes any room beside another: its
        controller grows its share as its load needs, and the empty GPUs stay for models to come.
        A further one is capacity its model lacks, which a third of a GPU's SMs hardly adds (on 8
        nodes with the code trace such starts left bursts short): it goes beside another only with
        ROOMY_SHARE free, else on an empty GPU (its idle power is paid already), and takes a
        smaller share only rather than wake a node. GPUs in ``taken`` (a start earlier in the same
        plan) are left alone. A tensor-parallel instance takes its GPUs whole (see
        ``_memory_fraction``); so does every instance starting on an empty GPU without the local
        controller (the ablation's): no share shrinks then, so nothing could ever join it, and
        the memory kept for a co-resident would be KV room lost."""
        room = self._room(view)
        fraction = self._memory_fraction(view, model)
        alone = fraction if self.uses_control else 1.0  # memory of a start with all of a GPU's SMs
        further = any(i.phase <= InstancePhase.READY for i in view.instances_of(model.name))
        wanted_share = ROOMY_SHARE if further else MIN_START_SHARE
        shared = room.colocation(view, model.name, fraction, taken, wanted_share)
        if shared is None:
            free = room.empty_gpus(view, model.tp, taken)
            if free is not None:
                return StartInstance(model.name, free, sm_pct=100.0, memory_fraction=alone)
            if further:
                shared = room.colocation(view, model.name, fraction, taken)
        if shared is not None:
            return StartInstance(model.name, (shared[0],), sm_pct=shared[1], memory_fraction=fraction)
        off = room.off_node(view, taken)
        if off is None:
            return None
        return StartInstance(model.name, tuple(off.gpus[:model.tp]), sm_pct=100.0, memory_fraction=alone)

    def _room(self, view: ClusterView) -> Headroom:
        if self._headroom is None:
            self._headroom = Headroom.of(view)
        return self._headroom

    # -- local control ----------------------------------------------------------------------------

    def load_of(self, inst: InstanceView) -> Load:
        """What the controller plans for: the instance's sequences and a typical request arriving."""
        return Load(inst.id, inst.model, inst.running + inst.waiting,
                    inst.pending_prompt_tokens + int(self._typical(inst.model).prompt_tokens), inst.arrival_rate_per_s)

    def _loads(self, gpu: GpuView, view: ClusterView) -> list[Load]:
        return [self.load_of(view.instance(i)) for i in gpu.instances
                if view.instance(i).phase <= InstancePhase.DRAINING]

    def solve(self, view: ClusterView, loads: Sequence[Load]) -> Solution | None:
        """The lowest-power clock, SM shares and prefill chunks meeting every load's SLO, or None."""
        best: tuple[float, Solution] | None = None
        targets = {load.instance_id: self._control_ttft_s(view, load) for load in loads}  # clock-independent
        for clock in self._clocks:
            shares: dict[int, float] = {}
            chunks: dict[int, int] = {}
            for load in loads:
                least = self._least_share(view, load, clock, targets[load.instance_id])
                if least is None:
                    break
                shares[load.instance_id], chunks[load.instance_id] = least
            else:
                if sum(shares.values()) > 100.0:
                    continue
                power = self._dynamic_power_w(view, loads, shares, clock)
                if best is None or power < best[0] - 1e-9:
                    best = (power, Solution(clock, shares, chunks))
        return None if best is None else best[1]

    def _overloaded(self, view: ClusterView, loads: Sequence[Load]) -> Solution:
        """Best effort where no setting keeps every SLO: full clock; a load that can keep its SLOs
        there gets its least share, the others split what is left (all scaled down to fit); each
        gets the largest chunk whose steps keep its TBT SLO at its share. TBT comes first: a chunk
        too long spoils a token of every sequence decoding, a queue only the requests waiting."""
        clock = self.gpu_spec.max_clock_mhz
        least = {load.instance_id: self._least_share(view, load, clock, self._control_ttft_s(view, load))
                 for load in loads}
        wanting = [i for i, found in least.items() if found is None]
        held = sum(found[0] for found in least.values() if found is not None)
        rest = max(SHARES[0], (100.0 - held) / len(wanting)) if wanting else 0.0
        shares = {i: rest if found is None else found[0] for i, found in least.items()}
        scale = min(1.0, 100.0 / sum(shares.values()))
        shares = {i: max(1.0, math.floor(share * scale)) for i, share in shares.items()}
        chunks = {load.instance_id: self._tbt_chunk(view, load, shares[load.instance_id], clock) for load in loads}
        return Solution(clock, shares, chunks)

    def _tbt_chunk(self, view: ClusterView, load: Load, sm_pct: float, clock_mhz: int) -> int:
        """The largest prefill chunk whose steps keep the load's TBT SLO, else the smallest."""
        speeds = self._speeds_of(view, load, sm_pct, clock_mhz)
        limit_s = view.model(load.model).slo.tbt_s
        return next((chunk for chunk, tail_s in zip(CHUNKS, speeds.tbt_tail_s) if tail_s <= limit_s), CHUNKS[-1])

    def _least_share(self, view: ClusterView, load: Load, clock: int, ttft_s: float) -> tuple[float, int] | None:
        """The least SM share keeping the load's SLOs (``ttft_s`` the TTFT it is held to) and its
        chunk, by bisection: SLOs only get easier with more share."""
        chunk = self._chunk_for(view, load, 100.0, clock, ttft_s)
        if chunk is None:
            return None
        lo, hi = 0, len(SHARES) - 1  # SHARES[hi] meets the SLO (with ``chunk``); find the first that does
        while lo < hi:
            mid = (lo + hi) // 2
            found = self._chunk_for(view, load, SHARES[mid], clock, ttft_s)
            if found is not None:
                hi, chunk = mid, found
            else:
                lo = mid + 1
        return float(SHARES[lo]), chunk

    def _dynamic_power_w(self, view: ClusterView, loads: Sequence[Load], shares: dict[int, float],
                         clock: int) -> float:
        total = 0.0
        idle_w = self.gpu_spec.idle_w
        for load in loads:
            if load.batch == 0:
                continue
            steps = self._steps(load.model, shares[load.instance_id], clock)
            total += steps.decode_step_power_w(load.batch) - idle_w
        return total

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        if not self.uses_control:
            return None
        loads = self._loads(gpu, view)
        if not loads:
            return None
        if not self.context.live_share_change:
            return self._control_at_shares(gpu, view, loads)
        # Least shares: what is left stays free for another model to co-locate here.
        solved = self.solve(view, loads) or self._overloaded(view, loads)
        clock, shares, chunks = solved.clock_mhz, solved.sm_pct, solved.chunk_tokens
        clock = self._with_hysteresis(gpu.clock_mhz, clock)
        current = {i: view.instance(i).sm_pct for i in shares}
        changed = {i: s for i, s in shares.items() if abs(s - current[i]) >= 10}
        if sum(changed.get(i, current[i]) for i in shares) > 100.0:
            # A grown share needs the room of shrinks too small to make alone.
            changed.update({i: s for i, s in shares.items() if s < current[i]})
        # Shrink shares first so a grown share always finds room.
        ordered = dict(sorted(changed.items(), key=lambda kv: kv[1] - current[kv[0]]))
        new_chunks = {i: c for i, c in chunks.items() if c != view.instance(i).chunk_tokens}
        if clock == gpu.clock_mhz and not ordered and not new_chunks:
            return None
        return GpuSettings(clock_mhz=clock, sm_pct=ordered, chunk_tokens=new_chunks)

    def _control_at_shares(self, gpu: GpuView, view: ClusterView, loads: Sequence[Load]) -> GpuSettings | None:
        """``control`` where a running instance's share cannot change (MPS): clock and chunks for
        the shares the instances have, and the share restarts that ``_restarts`` asks for."""
        shares = {load.instance_id: view.instance(load.instance_id).sm_pct for load in loads}
        solved = self.solve_at(view, loads, shares) or self._overloaded_at(view, loads, shares)
        clock = self._with_hysteresis(gpu.clock_mhz, solved.clock_mhz)
        restarts = self._restarts(gpu, view, loads)
        new_chunks = {i: c for i, c in solved.chunk_tokens.items() if c != view.instance(i).chunk_tokens}
        if clock == gpu.clock_mhz and not restarts and not new_chunks:
            return None
        return GpuSettings(clock_mhz=clock, sm_pct=restarts, chunk_tokens=new_chunks)

    def solve_at(self, view: ClusterView, loads: Sequence[Load], shares: dict[int, float]) -> Solution | None:
        """The lowest-power clock and prefill chunks meeting every load's SLO at these shares, or None."""
        best: tuple[float, Solution] | None = None
        targets = {load.instance_id: self._control_ttft_s(view, load) for load in loads}
        for clock in self._clocks:
            chunks: dict[int, int] = {}
            for load in loads:
                chunk = self._chunk_for(view, load, shares[load.instance_id], clock, targets[load.instance_id])
                if chunk is None:
                    break
                chunks[load.instance_id] = chunk
            else:
                power = self._dynamic_power_w(view, loads, shares, clock)
                if best is None or power < best[0] - 1e-9:
                    best = (power, Solution(clock, dict(shares), chunks))
        return None if best is None else best[1]

    def _overloaded_at(self, view: ClusterView, loads: Sequence[Load], shares: dict[int, float]) -> Solution:
        """Best effort at these shares where no clock keeps every SLO: full clock, and each load the
        largest chunk that keeps its SLOs there, else the largest that keeps its TBT."""
        clock = self.gpu_spec.max_clock_mhz
        chunks = {}
        for load in loads:
            share = shares[load.instance_id]
            chunk = self._chunk_for(view, load, share, clock)
            chunks[load.instance_id] = chunk if chunk is not None else self._tbt_chunk(view, load, share, clock)
        return Solution(clock, dict(shares), chunks)

    def _restarts(self, gpu: GpuView, view: ClusterView, loads: Sequence[Load]) -> dict[int, float]:
        """The share restarts to ask for: an instance whose SLOs no clock keeps at its share grows
        into its GPUs' free SMs (to the least share that keeps them, or all it can get); one whose
        needed share (the least that keeps its SLOs at full clock) has stayed SHRINK_GAP_PCT or
        more below its own for SHARE_SETTLE_S shrinks to the most it needed meanwhile. A share
        above that only buys a lower clock, which saves less than the SMs are worth to a
        co-resident (a model placed beside it rather than on GPUs of their own). Only a ready
        instance with no restart of its model on its GPUs under way, and at most once per
        SHARE_SETTLE_S for its model on its GPUs (a replacement is a new instance in the same place),
        and only where a second copy fits in its GPUs' memory (``_room_for_a_copy``)."""
        now = view.now_s
        for key, since in list(self._restarted_s.items()):
            if now - since >= SHARE_SETTLE_S:
                del self._restarted_s[key]
        clock = self.gpu_spec.max_clock_mhz
        asked: dict[int, float] = {}
        free_pct: dict[int, float] = {}  # per GPU, less what grows asked for here take
        for load in loads:
            inst = view.instance(load.instance_id)
            key = (inst.model, inst.gpus)
            if (inst.phase is not InstancePhase.READY or key in self._restarted_s or self._restarting(view, inst)
                    or not self._room_for_a_copy(view, inst)):
                self._low_since.pop(inst.id, None)
                continue
            target = self._control_ttft_s(view, load)
            if self._chunk_for(view, load, inst.sm_pct, clock, target) is None:  # short at any clock
                self._low_since.pop(inst.id, None)
                least = self._least_share(view, load, clock, target)
                free = min(free_pct.setdefault(g, 100.0 - view.gpu(g).sm_pct_allocated) for g in inst.gpus)
                grown = min(100.0 if least is None else least[0], inst.sm_pct + free)
                grown -= grown % SHARES[0]
                if grown >= inst.sm_pct + SHARES[0]:
                    asked[inst.id] = grown
                    for g in inst.gpus:
                        free_pct[g] -= grown - inst.sm_pct
                continue
            least = self._least_share(view, load, clock, target)
            need = inst.sm_pct if least is None else least[0]
            if need > inst.sm_pct - SHRINK_GAP_PCT:
                self._low_since.pop(inst.id, None)
                continue
            since, most = self._low_since.get(inst.id, (now, need))
            self._low_since[inst.id] = (since, max(most, need))
            if now - since >= SHARE_SETTLE_S:
                asked[inst.id] = max(most, need)
        for instance_id in asked:
            inst = view.instance(instance_id)
            self._restarted_s[inst.model, inst.gpus] = now
            self._low_since.pop(instance_id, None)
        return asked

    @staticmethod
    def _room_for_a_copy(view: ClusterView, inst: InstanceView) -> bool:
        """Whether its GPUs have the memory for a second copy, so a restart keeps it serving while
        the replacement loads. Without it, the instance would drain first and its requests wait
        for the drain and the load (measured on the code trace: most of the TTFT misses that such
        restarts added), longer than running at the share it has."""
        return all(1.0 - view.gpu(g).memory_fraction_allocated >= inst.memory_fraction - 1e-9 for g in inst.gpus)

    @staticmethod
    def _restarting(view: ClusterView, inst: InstanceView) -> bool:
        """Whether a restart of the instance's model on its GPUs is under way (the other instance
        loading, or the old one still draining): it is left alone until that is done."""
        return any(other.id != inst.id and other.gpus == inst.gpus and other.phase is not InstancePhase.READY
                   for other in view.instances_of(inst.model))

    def _with_hysteresis(self, current: int, wanted: int) -> int:
        if wanted >= current:
            return wanted  # raise at once
        steps = sum(1 for c in self._clocks if wanted <= c < current)
        return wanted if steps >= 2 else current

    # -- scaling and consolidation ----------------------------------------------------------------

    def scale(self, view: ClusterView) -> Plan:
        """Scale out ahead of need; scale in what packing left idle.

        A model gets one more instance when its every instance is within 30% of its SLO limit, or
        when it has fewer than its recent bursts need (``_burst_instances``), for as long as
        SCALE_OUT_AFTER_S: the next burst does not wait for a cold start. An idle instance draws no
        power of its own, but it holds GPUs that keep a node on: with consolidation, instances idle
        for SCALE_IN_IDLE_S are stopped while another instance of the model has spare room and the
        bursts do not need them (packing sends new requests to the fullest safe instance, so the
        extra ones drain and go idle), where more than one node is powered (one alone never goes
        off). A quiet model's last instance is not stopped here: on a node that stays on it holds
        no energy, and stopping it costs its next request a cold start. It goes when its node is
        emptied (``_emptying``) or its GPU is wanted (``_by_eviction``).
        """
        self._refresh_typical()
        if self._low_since:
            live = {i.id for i in view.instances()}
            self._low_since = {i: low for i, low in self._low_since.items() if i in live}
        room = self._headroom = Headroom.of(view)
        actions: list[StartInstance | StopInstance] = []
        evicted: set[int] = set()
        taken: set[int] = set()  # GPUs this plan starts instances on: one start per GPU per plan
        need = self._burst_instances(view)
        actions += self._first_instances(view, taken)
        # Scaling in pays only where it can let a node go off: never with one node powered.
        scale_in = self.uses_consolidation and len(view.nodes()) - len(room.off_nodes) > 1
        for model in view.models():
            instances = serving(view.instances_of(model.name))
            if not instances:
                continue
            if any(i.phase is InstancePhase.LOADING for i in instances):
                self._short.discard(model.name)  # capacity is on its way
                continue
            if scale_in and len(instances) > 1:
                idle = [i for i in instances if not i.running and not i.waiting
                        and view.now_s - i.last_busy_s > SCALE_IN_IDLE_S]
                busy = [i for i in instances if i not in idle]
                if (idle and busy and any(self._has_spare(view, i) for i in busy)
                        and len(instances) > need.get(model.name, 0)):
                    actions.append(StopInstance(idle[-1].id))  # the newest idle one: one per tick
                    continue
            short = model.name in self._short or len(instances) < need.get(model.name, 0)
            self._short.discard(model.name)
            if not short and any(self._has_spare(view, i) for i in instances):
                self._pressed_since.pop(model.name, None)
                continue
            # Scale out on a shortage that lasts: a moment's queue is served sooner by the ready
            # instances than by a cold start, and an instance started for it holds GPUs long after.
            since = self._pressed_since.setdefault(model.name, view.now_s)
            if view.now_s - since >= SCALE_OUT_AFTER_S:
                start = self._where_to_start(view, model, frozenset(taken))
                if start is None and short:
                    start = self._by_eviction(view, model, evicted, need, taken)
                if start is not None:
                    evicted.update(start.evict)
                    taken.update(start.gpus)
                    actions.append(start)
                    self._pressed_since.pop(model.name, None)
        return Plan(tuple(actions), "scale")

    def _first_instances(self, view: ClusterView, taken: set[int]) -> list[StartInstance]:
        """Each model's first instance, at the first scale tick, the widest first, where
        ``_where_to_start`` puts it: the first requests, often a burst, then find a warm instance
        instead of a cold start (the serving baselines deploy up front too). Only where the
        powered GPUs hold one instance of every model at full share: a model left out would find
        every GPU's SMs taken by idle instances. Once: a model scaled to zero later starts again on
        its next request."""
        if self._deployed:
            return []
        self._deployed = True
        waiting = [m for m in sorted(view.models(), key=lambda m: -m.tp) if not serving(view.instances_of(m.name))]
        if sum(m.tp for m in waiting) > sum(1 for _ in view.free_gpus()):
            return []
        starts = []
        for model in waiting:
            start = self._where_to_start(view, model, frozenset(taken))
            if start is not None:
                taken.update(start.gpus)
                starts.append(start)
        return starts

    def _burst_instances(self, view: ClusterView) -> dict[str, int]:
        """Instances each model needs for its recent bursts, chosen across models.

        A request's burst is drained in time by n instances when the tokens that arrived within
        its model's window (one TTFT SLO) before it take n instances at full speed at most
        BURST_DRAIN_WINDOWS windows: the last of them arrives a window after the first and has
        its own SLO, at least a window, so two windows, less a quarter for what routing leaves
        unbalanced between instances. Instances are added greedily where they make the most requests' bursts
        drain in time per GPU held (a 70B model at TP4 pays four), until BURST_ATTAINMENT of all
        recent requests are: burst capacity goes where it buys the most SLO per watt."""
        counts: dict[str, np.ndarray] = {}
        capacity: dict[str, float] = {}  # tokens one instance drains in time
        cost: dict[str, float] = {}
        for name, meter in self._bursts.items():
            bursts = meter.bursts(view.now_s)
            if not len(bursts):
                continue
            model = view.model(name)
            full = self._steps(name, 100.0, self.gpu_spec.max_clock_mhz)
            tokens_per_s = PREFILL_CHUNK_TOKENS / full.prefill_s[PREFILL_CHUNK_TOKENS // PENDING_QUANTUM]
            counts[name] = bursts
            capacity[name] = tokens_per_s * BURST_DRAIN_WINDOWS * meter.window_s
            cost[name] = model.tp * self._memory_fraction(view, model)
        total = sum(len(b) for b in counts.values())
        if not total:
            return {}

        def drained(name: str, n: int) -> int:  # requests whose burst n instances drain in time
            return int(np.searchsorted(counts[name], n * capacity[name], side="right"))

        need = {name: 1 for name in counts}
        met = sum(drained(name, 1) for name in counts)
        while met < BURST_ATTAINMENT * total:
            name = max(counts, key=lambda m: (drained(m, need[m] + 1) - drained(m, need[m])) / cost[m])
            gain = drained(name, need[name] + 1) - drained(name, need[name])
            if gain <= 0:
                break
            need[name] += 1
            met += gain
        return need

    def _by_eviction(self, view: ClusterView, model: ModelInfo, evicted: set[int],
                     need: dict[str, int], taken: Collection[int] = ()) -> StartInstance | None:
        """Room for a model that keeps missing its SLOs on a full cluster: an idle instance of
        another model that has spare room elsewhere, and more instances than its bursts need,
        gives up its place. Capacity follows the load instead of staying with whichever model
        scaled out first. A model with no instance at all comes before another's burst capacity:
        then an idle instance of any model that keeps another one makes way, or a quiet model's
        last (else every request of it is dropped until some model scales in)."""
        fraction = self._memory_fraction(view, model)
        starving = not serving(view.instances_of(model.name))
        fallback: StartInstance | None = None
        for other in view.models():
            if other.name == model.name:
                continue
            instances = serving(view.instances_of(other.name))
            surplus = len(instances) > need.get(other.name, 0)
            for victim in instances:
                if (victim.id in evicted or victim.phase is not InstancePhase.READY or victim.running
                        or victim.waiting):
                    continue
                # A model with none comes before another's second instance, or a quiet model's last.
                spared = starving and (len(instances) > 1 or self._quiet(view, victim))
                if not surplus and not spared:
                    continue
                start = self._in_place_of(view, model, fraction, victim, taken)
                if start is None:
                    continue
                rest = [i for i in instances if i.id != victim.id and i.id not in evicted]
                if surplus and rest and any(self._has_spare(view, i) for i in rest):
                    return start
                if spared and fallback is None:
                    fallback = start
        return fallback

    @staticmethod
    def _in_place_of(view: ClusterView, model: ModelInfo, fraction: float, victim: InstanceView,
                     taken: Collection[int]) -> StartInstance | None:
        """A start of ``model`` on ``victim``'s GPUs once it is gone, where the memory and SM
        share it leaves (with its co-residents') fit one."""
        fits = []
        for g in victim.gpus:
            gpu = view.gpu(g)
            memory_free = 1.0 - gpu.memory_fraction_allocated + victim.memory_fraction
            sm_free = 100.0 - gpu.sm_pct_allocated + victim.sm_pct
            if g not in taken and _fits_beside(memory_free, sm_free, fraction):
                fits.append((g, sm_free))
        if len(fits) < model.tp:
            return None
        fits = fits[:model.tp]
        return StartInstance(model.name, tuple(g for g, _ in fits), sm_pct=min(sm for _, sm in fits),
                             memory_fraction=fraction, evict=(victim.id,))

    def _quiet(self, view: ClusterView, inst: InstanceView) -> bool:
        """Idle for QUIET_KEEP_ALIVES keep-alives: its model has gone quiet, for now."""
        return (not inst.running and not inst.waiting
                and view.now_s - inst.last_busy_s > QUIET_KEEP_ALIVES * self.context.keep_alive_s)

    def _has_spare(self, view: ClusterView, inst: InstanceView) -> bool:
        """Room at full speed for 30% more load than now, SLOs kept (the placement check's estimate)."""
        now = self.load_of(inst)
        grown = Load(inst.id, inst.model, int(now.batch * 1.3) + 2, int(now.pending_tokens * 1.3),
                     now.rate_per_s * 1.3)
        return self._meets_slo(view, grown, self._reachable_share(view, inst), self.gpu_spec.max_clock_mhz,
                               self._typical_ttft_slo_s(view, inst.model))

    def consolidate(self, view: ClusterView) -> Plan:
        if not self.uses_consolidation:
            return Plan()
        powered = [n for n in view.nodes() if n.power is not NodePower.OFF]
        used = sum(1 for n in powered for g in n.gpus if view.gpu(g).instances)
        free_elsewhere = sum(len(n.gpus) for n in powered) - used
        # Headroom for bursts grows with the load: waking a node takes minutes.
        spare = max(SPARE_GPUS, math.ceil(SPARE_SHARE * used))
        actions: list[PowerOff | PowerOn | Migrate] = []
        for node in powered:
            if node.power is NodePower.ON and all(not view.gpu(g).instances for g in node.gpus):
                since = self._empty_since.setdefault(node.id, view.now_s)
                # Only a node empty for a while and not needed for headroom goes off.
                if view.now_s - since >= self.context.resume_time_s and free_elsewhere - len(node.gpus) >= spare:
                    actions.append(PowerOff(node.id))
                    free_elsewhere -= len(node.gpus)
            else:
                self._empty_since.pop(node.id, None)
        if actions:
            return Plan(tuple(actions), "power off empty nodes")
        if free_elsewhere < spare:
            off = [n for n in view.nodes() if n.power is NodePower.OFF]
            if off:
                return Plan((PowerOn(off[0].id),), "headroom")
        moves = self._evacuation(view)
        return Plan(tuple(moves), "evacuate the least loaded node") if moves else Plan()

    def _evacuation(self, view: ClusterView) -> list[Migrate | StopInstance]:
        """Moves (and stops) that empty one node: the least loaded one that can be emptied of the
        EVACUATION_TRIES least loaded (the least loaded alone may have nowhere to go, say when
        the busier nodes are full, while a busier one fits into it and the rest)."""
        nodes = [n for n in view.nodes() if n.power is NodePower.ON and any(view.gpu(g).instances for g in n.gpus)]
        if len(nodes) < 2:
            return []
        if any(i.phase is InstancePhase.LOADING for i in view.instances()):
            return []  # one round of moves at a time
        load = {n.id: sum(view.instance(i).running + view.instance(i).waiting + 1
                          for g in n.gpus for i in view.gpu(g).instances) for n in nodes}
        # Hypothetical state of the powered GPUs, built once for every try.
        room = {g: GpuRoom(1.0 - view.gpu(g).memory_fraction_allocated, view.gpu(g).sm_pct_allocated,
                           tuple(self._loads(view.gpu(g), view)))
                for n in nodes for g in n.gpus}
        for source in sorted(nodes, key=lambda n: load[n.id])[:EVACUATION_TRIES]:
            plan = self._emptying(view, source, {g: r for g, r in room.items() if g not in source.gpus})
            if plan:
                return plan
        return []

    def _emptying(self, view: ClusterView, source: NodeView,
                  room: dict[int, GpuRoom]) -> list[Migrate | StopInstance]:
        """Moves of every instance on ``source`` into ``room`` within SLOs (quiet ones are stopped),
        when the energy saved over the horizon repays them; else none (no partial moves)."""
        moving = sorted({i for g in source.gpus for i in view.gpu(g).instances},
                        key=lambda i: -view.model(view.instance(i).model).tp)
        plan: list[Migrate | StopInstance] = []
        for instance_id in moving:
            inst = view.instance(instance_id)
            if inst.phase is not InstancePhase.READY:
                return []
            if self._quiet(view, inst):
                plan.append(StopInstance(inst.id))  # scaled to zero rather than moved: nothing to repay
                continue
            model = view.model(inst.model)
            target = self._fit(view, model, inst, room)
            if target is None:
                return []  # the node cannot be emptied within SLOs
            gpus, fraction, share = target
            plan.append(Migrate(inst.id, gpus, sm_pct=share, memory_fraction=fraction))
        saved_j = CONSOLIDATION_HORIZON_S * (self.context.node_static_w
                                             + len(source.gpus) * self.gpu_spec.idle_w)
        cost_j = sum(self._load_energy_j(view.model(view.instance(m.instance_id).model))
                     for m in plan if isinstance(m, Migrate))
        return plan if saved_j > cost_j else []

    def _load_s(self, model: ModelInfo) -> float:
        return self.context.load_init_s + model.weights_bytes_per_gpu / (self.context.load_gbs * 1e9)

    def _load_energy_j(self, model: ModelInfo) -> float:
        return self._load_s(model) * model.tp * (self.gpu_spec.idle_w + 30.0)

    def _fit(self, view: ClusterView, model: ModelInfo, inst: InstanceView,
             room: dict[int, GpuRoom]) -> tuple[tuple[int, ...], float, float] | None:
        """GPUs (same node) where the instance fits with every co-resident's SLO kept; updates ``room``."""
        fraction = inst.memory_fraction
        moved = dataclasses.replace(self.load_of(inst), instance_id=-1 - inst.id)
        by_node: dict[int, list[int]] = {}
        for g, gpu_room in room.items():
            if gpu_room.memory_free + 1e-9 >= fraction:
                by_node.setdefault(view.gpu(g).node, []).append(g)
        # Prefer the fullest GPUs that still fit (best fit keeps other GPUs empty).
        for gpus in sorted(by_node.values(), key=lambda gs: min(room[g].memory_free for g in gs)):
            gpus.sort(key=lambda g: room[g].memory_free)
            chosen: list[int] = []
            share = 0.0
            for g in gpus:
                solved = self.solve(view, [*room[g].loads, moved])
                # The move must fit beside what the GPU holds now and what this plan already moved
                # there, at their shares: residents shrink only later.
                if solved is None or solved.sm_pct[moved.instance_id] > 100.0 - room[g].sm_pct_used:
                    continue
                share = max(share, solved.sm_pct[moved.instance_id])  # one share serves all its GPUs
                chosen.append(g)
                if len(chosen) == model.tp:
                    break
            if len(chosen) == model.tp and all(share <= 100.0 - room[g].sm_pct_used for g in chosen):
                for g in chosen:
                    room[g] = GpuRoom(room[g].memory_free - fraction, room[g].sm_pct_used + share,
                                      (*room[g].loads, moved))
                return tuple(chosen), fraction, share
        return None


@register
class FestinaPlacementOnly(FestinaPolicy):
    """Ablation: energy-first placement alone (max clock, shares as started, no consolidation)."""

    name = "festina-placement"
    uses_control = False
    uses_consolidation = False


@register
class FestinaPlacementControl(FestinaPolicy):
    """Ablation: placement plus the phase-aware local controller, no consolidation."""

    name = "festina-control"
    uses_consolidation = False
