"""``dynamollm``: per-request-type instance pools, each sized to its load and run at the lowest clock meeting its SLOs.

What is kept of DynamoLLM (Stojkovic et al., "DynamoLLM: Designing LLM
Inference Clusters for Performance and Energy Efficiency", HPCA'25):
instances own whole GPUs (no co-location) and the cluster re-configures to
the load at its levels, cluster (instance count), pool and instance
(frequency).

Pools: a model's requests are split into pools by prompt length, short
(under ``POOL_PROMPT_TOKENS[0]``), medium (under ``POOL_PROMPT_TOKENS[1]``)
and long, as DynamoLLM groups requests into types by their input (and
output) length because each type has its own energy-optimal configuration.
Each pool has its own instances. A request goes to an instance with room in
its own pool, else in a longer one (a longer pool's clock is set for longer
prompts, so it meets a shorter request's SLO too), else in a shorter one
(whose clock control() raises for the queued prompt): a pool's overflow goes
to the model's other instances. The router samples two instances per pool
(vllm's power of two choices); before a new instance starts, every instance
of the model is looked at (DynamoLLM's cluster manager knows each one's
load). Only when none has room does a new instance start, as for vllm
(``common.place_on_whole_gpus``: not while another start of the model waits
for its node to resume), in the longest pool, which
serves every length; the next re-plan moves it to the pool that needs it.
Each pool's statistics (mean lengths, tail prompt) cover the requests its
instances may serve: its own and the shorter pools'.

Instance count (load-proportional, re-planned every ``scale_period_s``): an
instance's capacity at the SLO is, from the profile tables at max clock, the
request rate it serves at ``PLAN_UTILIZATION`` when decoding at the largest
batch whose time between tokens stays within the TBT planning headroom (and
whose sequences fit its KV cache), each request also prefilling its pool's
mean prompt. A pool's load in instances is its recent arrival rate
(``RATE_WINDOW_S``) over that capacity; the short and medium pools keep only
whole instances and pass the remainder on to the next longer pool (whose
instances serve their requests), so the model as a whole runs the ceiling
of its load in instances, not one partly used instance per pool: on the
shipped traces at 8 models over 8 nodes every model's load fits one
instance's capacity, so each model runs one pool (the longest), and pools
split a model only as its load grows. A re-plan first moves instances a pool
holds beyond its count to pools short of theirs (a pool is a routing and
clock label on whole-GPU instances; DynamoLLM re-assigns instances between
pools as loads shift), then starts and stops the rest. Scale-out
to that count is at once. Scale-in uses the peak 10-second rate of the last
``SCALE_IN_WINDOW_S`` with a ``SCALE_IN_MARGIN`` and happens only once a
pool has held more instances than that for ``SCALE_IN_WINDOW_S`` (a
hysteresis against flapping), and stops only instances idle for
``STOP_IDLE_S`` (tuning: the planner counts from mean lengths while bursts
of long prompts make the router start instances the load's mean does not
need; stopping busy ones only restarts them on the next burst). So a model
keeps an instance while it had requests within the window, and one silent
for twice the window goes to zero.

Frequency (per pool): on every control period each GPU gets the lowest of
the profile's tabulated clocks at which its instance's current batch
(running + waiting, at its pool's mean decode context) steps within the TBT
planning headroom, stretched by the prefills of its arrivals (its arrival
rate times its pool's mean prompt's prefill), and its pool's 99th-percentile
prompt, behind the instance's queued prompts, prefills within the
controller's TTFT target (``policy.common.TTFT_CONTROL`` of that prompt's
TTFT SLO; DynamoLLM states its SLOs on P99 latencies), each load (batch,
arrival rate, queued prompt tokens) taken at the larger of ``1 +
LOAD_MARGIN`` times its present value (a burst grows it before the next
decision) and its peak over the last ``PEAK_WINDOW_S`` (DynamoLLM sets
frequencies from a load prediction; here the recent peak). Both are tuning,
with the runs that chose them beside the constants. So a short pool's GPUs
run lower clocks than a long pool's, and where requests of several lengths
share an instance (the longest pool's) its clock meets the longest's needs.
A clock that would break either target at the present load is raised at
once; otherwise the clock moves only when the new one is at least two table
steps away (hysteresis against re-locking the clock on every batch change).

Simplified: re-sharding (changing a pool's tensor parallelism) is not
modelled: tensor parallelism is the model's fixed degree. Pools are by
prompt length only: the output length of a request is not known when it
arrives (DynamoLLM predicts it), and the simulator's SLOs depend on the
prompt. The load predictor is the recent rate (scale-out), the recent peak
rate (scale-in) and each instance's recent peak load (frequency).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence

from festina_hpc.cluster.figures import USABLE_MEMORY_FRAC
from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import (
    TBT_PLANNING,
    TTFT_CONTROL,
    TokenStats,
    chunked_prefill_s,
    free_gpu_group,
    has_room,
    idle_for_s,
    least_loaded,
    place_on_whole_gpus,
    route_with_room,
    serving,
)
from festina_hpc.policy.types import (
    Action,
    Arrival,
    ClusterView,
    EndedRequest,
    GpuSettings,
    GpuView,
    InstancePhase,
    InstanceView,
    Placement,
    Plan,
    Route,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.table import AXES

CLOCK_HYSTERESIS_STEPS = 2  # lower (or raise, when not forced) the clock only by this many table steps or more
PROMPT_QUANTILE = 0.99  # DynamoLLM states its SLOs on P99 latencies: the P99 prompt must prefill in time
# Pool boundaries in prompt tokens (short < 512 <= medium < 2048 <= long). DynamoLLM bins requests
# by input length into short, medium and long; these cut-offs are placed between the modes of the
# shipped Azure 2023 traces' prompt lengths (azure-conv: terciles 408 and 1109 tokens, a peak near
# 1,000-1,200; azure-code: terciles 880 and 2284), so each trace fills more than one pool.
POOL_PROMPT_TOKENS = (512, 2048)
POOLS = len(POOL_PROMPT_TOKENS) + 1
PLAN_UTILIZATION = 0.7  # an instance is planned to be this busy at its pool's load (MuxServe's sizing uses the same)
RATE_WINDOW_S = 30.0  # scale-out reads the arrival rate over this window
# Scale-in reads the peak 10 s rate over this window and waits this long with too many instances:
# DynamoLLM plans its pools from a load prediction over minutes. Tuning: 15 minutes, measured on the
# shipped traces (8 nodes, 8 models, 2 copies), the code trace's bursts coming minutes apart; with the
# settings below, 5 min gave code 10.806 kWh at 0.942 SLO attainment, 15 min 11.716 at 0.972, never
# scaling in 11.955 at 0.978 (conv 9.888, 9.891, 9.906 kWh, all at 0.995 or 0.996).
SCALE_IN_WINDOW_S = 900.0
RATE_BUCKET_S = 10.0
SCALE_IN_MARGIN = 0.25  # scale in to the count the peak rate plus this share needs
# Scale-in stops only an instance that has held no request for this long: the load planner's count
# is from mean lengths, while the router starts instances for bursts (a long prompt queued ahead),
# so stopping a busy surplus instance only starts another on the next burst. Tuning, measured on the
# shipped traces (8 nodes, 8 models, 2 copies; LOAD_MARGIN 2, PEAK_WINDOW_S 30): stopping busy ones
# too gave conv 10.413 kWh, 0.994 SLO, 37.0 GPU-h, code 11.529, 0.961; idle ones only conv 9.810,
# 0.995, 33.4, code 11.340, 0.966; never scaling in conv 9.825, 0.995, code 12.035, 0.974. At
# LOAD_MARGIN 3, idle for 10 s, 60 s, 300 s: code 11.716, 11.755, 11.935 kWh at 0.972, 0.971, 0.978.
STOP_IDLE_S = 10.0
# The clock is chosen for the larger of (1 + LOAD_MARGIN) times the present load (batch, arrival
# rate, queued prompt tokens) and the peak of each over the last PEAK_WINDOW_S: a burst grows an
# instance's load before the next decision, and DynamoLLM sets frequencies from a load prediction,
# here the recent peak. Tuning, measured on the shipped traces (8 nodes, 8 models, 2 copies; vllm:
# conv 12.935 kWh at 1.000 SLO attainment, code 12.714 at 0.984). Margin 1, 2, 3, 5: conv 9.682
# (margin 1 without scale-in), 9.810, 9.891, 10.289 kWh at 0.994 to 0.997; code 13.123 at 0.953
# (margin 1 without scale-in: slow GPUs keep long prompts queued, so the router starts more
# instances, 52.4 GPU-h), 11.340 at 0.966, 11.716 at 0.972, 11.920 at 0.981. Margin 3: conv within
# 1% of the least energy measured at 0.99 (margin 2) and code 0.6 point above margin 2's SLO
# attainment; margin 5 adds 0.9 point on code for 4% more on conv and keeps a light load at max
# clock most of the time. Without the peak (PEAK_WINDOW_S 0, no scale-in), margin 1 gave conv
# 10.129 at 0.992, code 13.459 at 0.958; margin 5 conv 10.469 at 0.997, code 12.043 at 0.981.
LOAD_MARGIN = 3.0
PEAK_WINDOW_S = 30.0


def pool_of(prompt_tokens: int) -> int:
    """The pool of a request with ``prompt_tokens``: 0 short, 1 medium, 2 long."""
    return bisect_right(POOL_PROMPT_TOKENS, prompt_tokens)


@register
class DynamoLlmPolicy(Policy):
    name = "dynamollm"

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.stats = TokenStats()  # the model's requests, all pools
        self.pool_stats = [TokenStats() for _ in range(POOLS)]  # pool p: requests of pools 0..p
        self.clocks_mhz = tuple(sorted(self.gpu_spec.table_clocks_mhz))  # ascending
        self._last_request_s: dict[str, float] = {}
        self._arrivals: dict[tuple[str, int], deque[list[int]]] = {}  # (model, pool) -> [10 s bucket, arrivals]
        self._pool_by_gpu: dict[int, int] = {}  # first GPU of an instance this policy started -> its pool
        self._excess_since: dict[tuple[str, int], float] = {}
        self._capacity_cache: dict[tuple[str, int, int, int], float] = {}
        self._load_samples: dict[int, deque[tuple[float, float, float, float]]] = {}  # instance -> (time, loads)

    # -- pools -------------------------------------------------------------------------------------

    def pool_of_instance(self, inst: InstanceView) -> int:
        """The instance's pool; one this policy did not start serves every length (the longest pool)."""
        return self._pool_by_gpu.get(inst.gpus[0], POOLS - 1)

    def _start(self, model: str, pool: int, view: ClusterView, exclude: set[int]) -> StartInstance | None:
        gpus = free_gpu_group(view, view.model(model).tp, exclude=exclude)
        if gpus is None:
            return None
        self._pool_by_gpu[gpus[0]] = pool
        return StartInstance(model, gpus)

    # -- placing -----------------------------------------------------------------------------------

    def feedback(self, done: Sequence[EndedRequest]) -> None:
        # Pool p learns the output lengths of the requests of pools 0..p, as its prompts (by prompt length).
        self.stats.learn(done)
        for outcome in done:
            for p in range(pool_of(outcome.prompt_tokens), POOLS):
                self.pool_stats[p].learn((outcome,))

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        model, now_s = request.model, view.now_s
        pool = pool_of(request.prompt_tokens)
        self.stats.observe_prompt(model, request.prompt_tokens)
        for p in range(pool, POOLS):
            self.pool_stats[p].observe_prompt(model, request.prompt_tokens)
        self._last_request_s[model] = now_s
        buckets = self._arrivals.setdefault((model, pool), deque())
        bucket = int(now_s // RATE_BUCKET_S)
        if buckets and buckets[-1][0] == bucket:
            buckets[-1][1] += 1
        else:
            buckets.append([bucket, 1])
        candidates = serving(view.instances_of(model))
        clock = self.gpu_spec.max_clock_mhz  # full is judged at max clock: control() raises the clock as needed
        # Its own pool, else a longer one (whose clock already meets a shorter prompt's needs), else a
        # shorter one (control() raises that instance's clock for the queued prompt): a pool's overflow
        # goes to the model's other instances before a new one starts.
        for p in [*range(pool, POOLS), *range(pool - 1, -1, -1)]:
            in_pool = [i for i in candidates if self.pool_of_instance(i) == p]
            target = route_with_room(self.store, view, request, in_pool, clock)
            if target is not None:
                return Route(target.id)
        # The router samples two instances per pool; before a new instance starts, every instance of
        # the model is looked at (a model has a few; DynamoLLM's cluster manager knows each one's load).
        roomy = [i for i in candidates
                 if i.phase is InstancePhase.READY and has_room(self.store, view, request, i, clock)]
        target = least_loaded(roomy)
        if target is not None:
            return Route(target.id)
        # No instance of the model has room: the whole-GPU baselines' fallback (a new instance, unless
        # one is already waiting for its node to resume), the new one in the longest pool (it serves
        # every length); scale() re-plans the pools on its next tick.
        placement = place_on_whole_gpus(self.store, view, request, clock)
        if isinstance(placement, StartInstance):
            self._pool_by_gpu[placement.gpus[0]] = POOLS - 1
        return placement

    # -- instance count ----------------------------------------------------------------------------

    def capacity_per_s(self, view: ClusterView, model: str, pool: int) -> float:
        """Requests per second one instance of the pool serves within the TBT headroom at PLAN_UTILIZATION."""
        stats = self.pool_stats[pool]
        prompt, output = stats.prompt_tokens(model), stats.output_tokens(model)
        key = (model, pool, int(round(prompt, -2)), int(round(output, -1)))  # lengths drift slowly: a coarse cache
        cached = self._capacity_cache.get(key)
        if cached is not None:
            return cached
        info = view.model(model)
        table = self.store.table(view.gpu_type, model)
        clock = self.gpu_spec.max_clock_mhz
        context = stats.decode_context_tokens(model)
        kv_tokens = max(0.0, USABLE_MEMORY_FRAC * self.gpu_spec.memory_bytes - info.weights_bytes_per_gpu) \
            / info.kv_bytes_per_token_per_gpu
        fits = max(1.0, kv_tokens / max(1.0, prompt + output))
        limit_s = TBT_PLANNING * info.slo.tbt_s
        batches = [b for b in table.axes[AXES.index("batch")] if b <= fits]
        batch = max((b for b in batches
                     if table.lookup("decode", b, context, 100.0, clock, clamp=True).latency_s <= limit_s),
                    default=1.0)
        step_s = table.lookup("decode", batch, context, 100.0, clock, clamp=True).latency_s
        busy_s = chunked_prefill_s(table, prompt, 100.0, clock) + output * step_s / batch
        capacity = PLAN_UTILIZATION / busy_s
        self._capacity_cache[key] = capacity
        return capacity

    def _rates(self, model: str, now_s: float) -> tuple[list[float], list[float]]:
        """Per pool: the recent arrival rate and the peak 10 s rate of the scale-in window."""
        now_bucket = int(now_s // RATE_BUCKET_S)
        oldest = now_bucket - int(SCALE_IN_WINDOW_S // RATE_BUCKET_S)
        recent_from = now_bucket - int(RATE_WINDOW_S // RATE_BUCKET_S)  # the current bucket and those before
        recent, peak = [], []
        for pool in range(POOLS):
            buckets = self._arrivals.get((model, pool))
            while buckets and buckets[0][0] < oldest:
                buckets.popleft()
            if not buckets:
                recent.append(0.0)
                peak.append(0.0)
                continue
            counted = sum(n for b, n in buckets if b > recent_from)
            recent.append(counted / RATE_WINDOW_S)
            peak.append(max(n for _, n in buckets) / RATE_BUCKET_S)
        return recent, peak

    def planned_counts(self, view: ClusterView, model: str, rates_per_s: list[float]) -> list[int]:
        """Instances per pool for these arrival rates: whole instances in the shorter pools, the
        remainder carried to the next longer pool, whose instances serve those requests too."""
        counts, carry = [], 0.0
        for pool, rate in enumerate(rates_per_s):
            load = carry + (rate / self.capacity_per_s(view, model, pool) if rate > 0 else 0.0)
            if pool == POOLS - 1:
                counts.append(math.ceil(load - 1e-9))
            else:
                counts.append(math.floor(load + 1e-9))
                carry = load - counts[-1]
        return counts

    def scale(self, view: ClusterView) -> Plan:
        now_s = view.now_s
        actions: list[Action] = []
        taken: set[int] = set()
        for info in view.models():
            model = info.name
            live = serving(view.instances_of(model))
            by_pool: list[list[InstanceView]] = [[] for _ in range(POOLS)]
            for inst in live:
                by_pool[self.pool_of_instance(inst)].append(inst)
            recent, peak = self._rates(model, now_s)
            out_counts = self.planned_counts(view, model, recent)
            in_counts = self.planned_counts(view, model, [(1 + SCALE_IN_MARGIN) * r for r in peak])
            keeps = [max(i, o) for i, o in zip(in_counts, out_counts)]
            self._reassign(by_pool, out_counts, keeps)
            stops: list[InstanceView] = []
            for pool in range(POOLS):
                have = len(by_pool[pool])
                for _ in range(out_counts[pool] - have):
                    start = self._start(model, pool, view, taken)
                    if start is None:
                        break
                    taken.update(start.gpus)
                    actions.append(start)
                keep = keeps[pool]
                if have <= keep:
                    self._excess_since.pop((model, pool), None)
                    continue
                since = self._excess_since.setdefault((model, pool), now_s)
                if now_s - since < SCALE_IN_WINDOW_S:
                    continue
                ready = [i for i in by_pool[pool]
                         if i.phase is InstancePhase.READY and idle_for_s(i, now_s) >= STOP_IDLE_S]
                ready.sort(key=lambda i: (i.running + i.waiting, i.last_busy_s))
                stops += ready[:have - keep]
            actions += [StopInstance(i.id) for i in stops]
        return Plan(tuple(actions), reason="instances to the load per pool" if actions else "")

    def _reassign(self, by_pool: list[list[InstanceView]], wanted: list[int], keeps: list[int]) -> None:
        """Move instances a pool holds beyond ``keeps`` to pools short of ``wanted``, in place.

        DynamoLLM re-assigns instances between pools as their loads shift rather than starting one
        in a pool while another drains: a pool is only a routing and clock label on whole-GPU
        instances, so moving one costs nothing."""
        for pool in range(POOLS):
            while len(by_pool[pool]) < wanted[pool]:
                donors = [p for p in range(POOLS) if p != pool and len(by_pool[p]) > keeps[p]]
                if not donors:
                    return
                donor = by_pool[max(donors, key=lambda p: len(by_pool[p]) - keeps[p])]
                inst = min(donor, key=lambda i: (i.phase is InstancePhase.READY, i.running + i.waiting))
                donor.remove(inst)
                by_pool[pool].append(inst)
                self._pool_by_gpu[inst.gpus[0]] = pool

    # -- frequency ---------------------------------------------------------------------------------

    def meets_slo(self, inst: InstanceView, view: ClusterView, clock_mhz: int, margin: float = 1.0,
                  floor: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> bool:
        """Whether the instance's current batch (times ``margin``) and its pool's tail prompt meet the
        latency targets at this clock; each load is at least ``floor`` (batch, arrival rate, pending
        prompt tokens: the predicted peak)."""
        slo = view.model(inst.model).slo
        stats = self.pool_stats[self.pool_of_instance(inst)]
        table = self.store.table(view.gpu_type, inst.model)
        batch = max(1.0, margin * (inst.running + inst.waiting), floor[0])
        rate_per_s = max(margin * inst.arrival_rate_per_s, floor[1])
        pending_tokens = max(margin * inst.pending_prompt_tokens, floor[2])
        context = stats.decode_context_tokens(inst.model)
        step_s = table.lookup("decode", batch, context, inst.sm_pct, clock_mhz, clamp=True).latency_s
        # Decoding gets the time prefills leave it (as common.predicted_tbt_s): arrivals at rate r, each
        # prefilling the pool's mean prompt.
        mean_prefill_s = chunked_prefill_s(table, stats.prompt_tokens(inst.model), inst.sm_pct, clock_mhz)
        if step_s / max(0.05, 1.0 - rate_per_s * mean_prefill_s) > TBT_PLANNING * slo.tbt_s:
            return False
        # The tail prompt, arriving behind the queue's prompts, prefills within the controller's target.
        prompt = stats.prompt_quantile(inst.model, PROMPT_QUANTILE)
        prefill_s = chunked_prefill_s(table, prompt + pending_tokens, inst.sm_pct, clock_mhz)
        return prefill_s <= TTFT_CONTROL * slo.ttft_for(int(prompt))

    def lowest_clock_mhz(self, inst: InstanceView, view: ClusterView, margin: float = 1.0,
                         floor: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> int:
        """The lowest table clock meeting the targets (latency falls as the clock rises), else the highest."""
        lo, hi = 0, len(self.clocks_mhz) - 1
        if not self.meets_slo(inst, view, self.clocks_mhz[hi], margin, floor):
            return self.clocks_mhz[hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self.meets_slo(inst, view, self.clocks_mhz[mid], margin, floor):
                hi = mid
            else:
                lo = mid + 1
        return self.clocks_mhz[lo]

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        instances = serving(view.instance(i) for i in gpu.instances)
        if not instances:
            return None
        inst = instances[0]  # whole GPUs: one instance per GPU
        # The clock is set for the load growing by LOAD_MARGIN before the next decision (a burst's
        # growth within a control period), and raised at once when the present load breaks a target.
        target = self.lowest_clock_mhz(inst, view, 1.0 + LOAD_MARGIN, self._peak_load(inst, view.now_s))
        current = gpu.clock_mhz
        if target == current:
            return None
        if target > current and not self.meets_slo(inst, view, current):
            return GpuSettings(clock_mhz=target)  # a target would break: raise at once
        if abs(self._step(target) - self._step(current)) >= CLOCK_HYSTERESIS_STEPS:
            return GpuSettings(clock_mhz=target)
        return None

    def _peak_load(self, inst: InstanceView, now_s: float) -> tuple[float, float, float]:
        """The instance's peak batch, arrival rate and pending prompt tokens over the last
        ``PEAK_WINDOW_S`` (its load prediction for the clock), this decision's load included."""
        samples = self._load_samples.setdefault(inst.id, deque())
        samples.append((now_s, float(inst.running + inst.waiting), inst.arrival_rate_per_s,
                        float(inst.pending_prompt_tokens)))
        while samples[0][0] < now_s - PEAK_WINDOW_S:
            samples.popleft()
        return (max(x[1] for x in samples), max(x[2] for x in samples), max(x[3] for x in samples))

    def _step(self, clock_mhz: int) -> int:
        """Index of the table clock nearest ``clock_mhz``."""
        i = bisect_left(self.clocks_mhz, clock_mhz)
        if i == len(self.clocks_mhz) or (i > 0 and clock_mhz - self.clocks_mhz[i - 1] < self.clocks_mhz[i] - clock_mhz):
            i -= 1
        return i
