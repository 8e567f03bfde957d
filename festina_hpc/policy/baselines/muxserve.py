"""``muxserve``: several models share a GPU through MPS, each with an SM share and memory sized to its load.

What is kept of MuxServe (Duan et al., "MuxServe: Flexible Spatial-Temporal
Multiplexing for Multiple LLM Serving", ICML'24): models are co-located on
the same GPUs (a "unit" of ``tp`` GPUs on one node) and share their compute
spatially through MPS, each instance holding an SM share and a slice of
memory (weights plus a KV-cache quota) sized to its workload; clocks stay at
the default (max). A model's need is the SM share that serves its arrival
rate at 70% utilisation, computed from the profile tables (per-request GPU
time at a full GPU: one prefill of a typical prompt plus its decode steps at
the largest batch whose time between tokens stays within the TBT planning
headroom), and never below the smallest share at which a typical prompt's
prefill and a decode step meet the shared planning headroom
(``policy.common.TTFT_PLANNING``, ``TBT_PLANNING``).

Placement is MuxServe's: offline, from each model's arrival rate known in
advance (``PolicyContext.known_rates_per_s``, the trace's mean rates, and
``known_lengths`` for the typical request), all at the first scale tick.
Its greedy algorithm takes the models by computation need (the SM share
their rate needs, times their GPUs), largest first, splits a model whose
need exceeds a GPU into that many instances, and puts each on the unit of
GPUs already in use that has the memory and the spare need for it (the
tightest fit, MuxServe's "unit with the most throughput gain" reduced to
best fit), else on free GPUs. Each GPU's SMs are then divided among its
instances in proportion to their needs (at least 10% each). Those shares
stay as placed: an MPS client's active-thread percentage is fixed when its
context is created, so a running instance's share never changes (unless
the site declares ``live_share_change``, when ``control`` re-divides each
GPU's SMs by the instances' recent arrival rates each control period).
Where no rate is known (festinad), a model is placed on its first request
by the same best fit with its measured rate. A model whose instances are
all full (TTFT or TBT headroom, or KV quota) gets another one, sized for
its measured rate; instances stay warm (MuxServe serves a fixed set of
models).

Simplified: MuxServe's enumeration of GPU mesh groups and its throughput
estimator become the greedy best fit above on the simulator's units. Its
adaptive batch scheduling, which interleaves prefill and decode jobs of
co-located models and moves KV-cache blocks between their quotas, is reduced
to fixed memory quotas (set at start: no resize action exists); the
simulator runs co-located instances concurrently, each at its share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from festina_hpc.cluster.figures import USABLE_MEMORY_FRAC
from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import (
    TBT_PLANNING,
    TTFT_PLANNING,
    TokenStats,
    free_gpu_group,
    least_loaded,
    predicted_tbt_s,
    prefill_time_s,
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
    Placement,
    Plan,
    Route,
    StartInstance,
)
from festina_hpc.profiles.table import AXES

TARGET_UTILIZATION = 0.7  # an SM share is sized so the model's load keeps it this busy
MIN_SHARE_PCT = 10.0  # MPS shares below this starve an instance
SHARE_STEP_PCT = 5.0  # re-size shares only when one moves by at least this much
KV_SEQUENCES_MIN = 32  # a memory quota holds at least this many typical sequences
KV_CONCURRENCY_FACTOR = 3.0  # ... and this many times the expected concurrent sequences
MEMORY_STEP = 0.05  # memory fractions are rounded up to this


@register
class MuxServePolicy(Policy):
    name = "muxserve"

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.stats = TokenStats()
        self._used_gpus: set[int] = set()  # GPUs this policy started instances on (co-location candidates)
        self._cost_cache: dict[tuple[str, int, int], tuple[float, float, float]] = {}
        for model, (prompt_tokens, output_tokens) in context.known_lengths.items():
            self.stats.prime(model, prompt_tokens, output_tokens)
        self._placed = False  # whether the offline placement from known rates has been made

    # -- sizing from the profiles ------------------------------------------------------------------

    def _costs(self, view: ClusterView, model: str) -> tuple[float, float, float]:
        """(smallest share meeting the latency targets, GPU-seconds per request at a full GPU,
        mean decoding sequences' lifetime in seconds) for the model's typical request."""
        prompt, output = self.stats.prompt_tokens(model), self.stats.output_tokens(model)
        key = (model, int(round(prompt, -2)), int(round(output, -1)))  # lengths drift slowly: a coarse cache
        cached = self._cost_cache.get(key)
        if cached is not None:
            return cached
        info = view.model(model)
        table = self.store.table(view.gpu_type, model)
        clock = self.gpu_spec.max_clock_mhz
        context = self.stats.decode_context_tokens(model)
        ttft_limit_s = TTFT_PLANNING * info.slo.ttft_for(int(prompt))
        tbt_limit_s = TBT_PLANNING * info.slo.tbt_s

        def prefill_s(share: float) -> float:
            return table.lookup("prefill", 1, prompt, share, clock, clamp=True).latency_s

        def decode_s(batch: float, share: float) -> float:
            return table.lookup("decode", batch, context, share, clock, clamp=True).latency_s

        shares = [s for s in table.axes[AXES.index("sm_pct")] if s >= MIN_SHARE_PCT] or [100.0]
        floor = next((s for s in shares if prefill_s(s) <= ttft_limit_s and decode_s(1, s) <= tbt_limit_s), 100.0)
        batches = table.axes[AXES.index("batch")]
        batch = max((b for b in batches if decode_s(b, 100.0) <= tbt_limit_s), default=1.0)
        step_s = decode_s(batch, 100.0)
        busy_s = prefill_s(100.0) + output * step_s / batch
        lifetime_s = prefill_s(100.0) + output * step_s
        self._cost_cache[key] = (floor, busy_s, lifetime_s)
        return floor, busy_s, lifetime_s

    def need_pct(self, view: ClusterView, model: str, rate_per_s: float) -> float:
        """SM share that serves ``rate_per_s`` requests of ``model`` within the latency targets."""
        floor, busy_s, _ = self._costs(view, model)
        return min(100.0, max(floor, MIN_SHARE_PCT, 100.0 * rate_per_s * busy_s / TARGET_UTILIZATION))

    def memory_fraction(self, view: ClusterView, model: str, rate_per_s: float) -> float:
        """Weights plus a KV quota for the expected concurrent sequences (Little's law), with headroom."""
        info = view.model(model)
        _, _, lifetime_s = self._costs(view, model)
        sequences = max(KV_SEQUENCES_MIN, KV_CONCURRENCY_FACTOR * rate_per_s * lifetime_s)
        tokens = sequences * (self.stats.prompt_tokens(model) + self.stats.output_tokens(model))
        usable = USABLE_MEMORY_FRAC * self.gpu_spec.memory_bytes
        fraction = (info.weights_bytes_per_gpu + tokens * info.kv_bytes_per_token_per_gpu) / usable
        return min(1.0, math.ceil(fraction / MEMORY_STEP) * MEMORY_STEP)

    # -- offline placement from known rates ---------------------------------------------------------

    def scale(self, view: ClusterView) -> Plan:
        """At the first scale tick, place every model with a known rate (MuxServe's offline placement)."""
        if self._placed:
            return Plan()
        self._placed = True
        starts = self.offline_placement(view)
        self._used_gpus.update(g for s in starts for g in s.gpus)
        return Plan(tuple(starts), "place every model from its known rate" if starts else "")

    def offline_placement(self, view: ClusterView) -> list[StartInstance]:
        """MuxServe's greedy placement of the models with known rates, shares divided per GPU."""
        known = self.context.known_rates_per_s
        units: list[tuple[float, str, int, float]] = []  # (computation need, model, instances, rate each)
        for info in view.models():
            rate = known.get(info.name, 0.0)
            if rate <= 0:
                continue
            _, busy_s, _ = self._costs(view, info.name)
            count = max(1, math.ceil(rate * busy_s / TARGET_UTILIZATION))  # instances of at most a GPU's need
            need = self.need_pct(view, info.name, rate / count)
            units += [(need * info.tp, info.name, count, rate / count)]
        units.sort(key=lambda u: (-u[0], u[1]))
        # Planned state per GPU: memory fraction, summed needs, models held (the view does not see the plan).
        memory: dict[int, float] = {}
        needs: dict[int, float] = {}
        held: dict[int, set[str]] = {}
        placed: list[tuple[str, tuple[int, ...], float, float]] = []  # (model, gpus, need, memory)
        for _, model, count, rate in units:
            tp = view.model(model).tp
            need = self.need_pct(view, model, rate)
            fraction = self.memory_fraction(view, model, rate)
            for _ in range(count):
                gpus = (self._planned_fit(view, model, tp, need, fraction, memory, needs, held, mixed=False)
                        or free_gpu_group(view, tp, exclude=memory.keys())
                        or self._planned_fit(view, model, tp, need, fraction, memory, needs, held, mixed=True))
                if gpus is None:
                    break  # no room: the model's requests start what it needs on demand
                for g in gpus:
                    memory[g] = memory.get(g, 0.0) + fraction
                    needs[g] = needs.get(g, 0.0) + need
                    held.setdefault(g, set()).add(model)
                placed.append((model, gpus, need, fraction))
        shares = divide_sms([(gpus, need) for _, gpus, need, _ in placed])
        return [StartInstance(model, gpus, sm_pct=share, memory_fraction=fraction)
                for (model, gpus, _, fraction), share in zip(placed, shares, strict=True)]

    @staticmethod
    def _planned_fit(view: ClusterView, model: str, tp: int, need: float, fraction: float,
                     memory: dict[int, float], needs: dict[int, float],
                     held: dict[int, set[str]], mixed: bool) -> tuple[int, ...] | None:
        """``tp`` planned GPUs on one node with memory and spare need for the instance, the tightest
        fit in memory; with ``mixed`` False only GPUs whose residents span as many GPUs as it does
        (an instance takes the same share on all its GPUs, so a narrow one beside a wide one caps
        the wide one's share on every GPU it spans: free GPUs come before such a fit)."""
        fits: dict[int, list[tuple[float, int]]] = {}
        for g, used in memory.items():
            if (model not in held[g] and used + fraction <= 1.0 + 1e-9 and needs[g] + need <= 100.0
                    and (mixed or all(view.model(m).tp == tp for m in held[g]))):
                fits.setdefault(view.gpu(g).node, []).append((1.0 - used - fraction, g))
        best: tuple[float, tuple[int, ...]] | None = None
        for group in fits.values():
            if len(group) >= tp:
                chosen = sorted(group)[:tp]
                leftover = sum(c[0] for c in chosen)
                if best is None or leftover < best[0]:
                    best = (leftover, tuple(sorted(c[1] for c in chosen)))
        return None if best is None else best[1]

    # -- placing -----------------------------------------------------------------------------------

    def feedback(self, done: Sequence[EndedRequest]) -> None:
        self.stats.learn(done)  # on top of the lengths known in advance (known_lengths primes them)

    def place(self, request: Arrival, view: ClusterView) -> Placement:
        self.stats.observe_prompt(request.model, request.prompt_tokens)
        model = view.model(request.model)
        candidates = serving(view.instances_of(request.model))
        limit_s = TBT_PLANNING * model.slo.tbt_s
        ttft_limit_s = TTFT_PLANNING * model.slo.ttft_for(request.prompt_tokens)
        clock = self.gpu_spec.max_clock_mhz
        seq_tokens = self.stats.prompt_tokens(request.model) + self.stats.output_tokens(request.model)
        roomy = [i for i in candidates
                 if predicted_tbt_s(self.store, view.gpu_type, i, clock,
                                    context_tokens=round(self.stats.decode_context_tokens(request.model)))
                 <= limit_s
                 and i.kv_tokens_reserved + (i.waiting + 1) * seq_tokens <= i.kv_capacity_tokens
                 and (i.phase is not InstancePhase.READY  # a loading one's queue waits for the load either way
                      or prefill_time_s(self.store, view.gpu_type, i.model,
                                        i.pending_prompt_tokens + request.prompt_tokens, i.sm_pct, clock)
                      <= ttft_limit_s)]
        best = least_loaded(roomy)
        if best is not None:
            return Route(best.id)
        start = self._start(request.model, model.tp, len(candidates), view)
        if start is not None:
            self._used_gpus.update(start.gpus)
            return start
        fallback = least_loaded(candidates)
        if fallback is not None:
            return Route(fallback.id)
        return Drop("no GPU with room for a new instance")

    def _start(self, model: str, tp: int, existing: int, view: ClusterView) -> StartInstance | None:
        rate = view.model_rate_per_s(model) / (existing + 1)  # the new instance takes its share of the load
        need = self.need_pct(view, model, rate)
        if not self.context.live_share_change:
            # Its share cannot grow later: it starts at least as large as the model's largest, which are full.
            need = max([need] + [i.sm_pct for i in serving(view.instances_of(model))])
        memory = self.memory_fraction(view, model, rate)
        shared = self._colocation(model, tp, need, memory, view)
        if shared is not None:
            gpus, free_pct = shared
            return StartInstance(model, gpus, sm_pct=min(need, free_pct), memory_fraction=memory)
        gpus_free = free_gpu_group(view, tp)
        if gpus_free is None:
            return None
        return StartInstance(model, gpus_free, sm_pct=need, memory_fraction=memory)

    def _colocation(self, model: str, tp: int, need: float, memory: float,
                    view: ClusterView) -> tuple[tuple[int, ...], float] | None:
        """``tp`` GPUs on one node, already in use, with room for the new instance (tightest fit first)."""
        fits: dict[int, list[tuple[float, int, float]]] = {}
        for g in sorted(self._used_gpus):
            gpu = view.gpu(g)
            if not gpu.instances:
                self._used_gpus.discard(g)
                continue
            residents = [view.instance(i) for i in gpu.instances]
            if any(i.model == model for i in residents):
                continue
            free_memory = 1.0 - gpu.memory_fraction_allocated
            free_pct = 100.0 - gpu.sm_pct_allocated
            needs = sum(self.need_pct(view, i.model, i.arrival_rate_per_s) for i in residents)
            if free_memory + 1e-9 >= memory and free_pct >= MIN_SHARE_PCT and needs + need <= 100.0:
                fits.setdefault(gpu.node, []).append((free_memory - memory, g, free_pct))
        best: tuple[float, tuple[int, ...], float] | None = None
        for group in fits.values():
            if len(group) < tp:
                continue
            chosen = sorted(group)[:tp]
            leftover = sum(c[0] for c in chosen)
            if best is None or leftover < best[0]:
                best = (leftover, tuple(sorted(c[1] for c in chosen)), min(c[2] for c in chosen))
        return None if best is None else (best[1], best[2])

    # -- control -----------------------------------------------------------------------------------

    def _targets(self, gpu: GpuView, view: ClusterView) -> dict[int, float]:
        """The GPU's SMs divided among its serving instances in proportion to their needs."""
        residents = serving(view.instance(i) for i in gpu.instances)
        if not residents:
            return {}
        budget = 100.0 - (MIN_SHARE_PCT if self._room_for_another(gpu, view) else 0.0)
        budget = max(budget, MIN_SHARE_PCT * len(residents))
        needs = {i.id: self.need_pct(view, i.model, i.arrival_rate_per_s) for i in residents}
        return proportional_shares(needs, budget, MIN_SHARE_PCT)

    def _room_for_another(self, gpu: GpuView, view: ClusterView) -> bool:
        present = {view.instance(i).model for i in gpu.instances}
        free_memory = 1.0 - gpu.memory_fraction_allocated
        return any(self.memory_fraction(view, m.name, 0.0) <= free_memory
                   for m in view.models() if m.name not in present)

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        if not self.context.live_share_change:
            return None  # a running MPS client's share is fixed: shares stay as placed
        targets = self._targets(gpu, view)
        shares: dict[int, float] = {}
        for instance_id, target in targets.items():
            inst = view.instance(instance_id)
            share = target
            for g in inst.gpus:
                if g != gpu.id:  # a tensor-parallel instance must fit every GPU it spans
                    other = view.gpu(g)
                    share = min(share, self._targets(other, view).get(instance_id, share),
                                100.0 - other.sm_pct_allocated + inst.sm_pct)
            shares[instance_id] = share
        if all(abs(s - view.instance(i).sm_pct) < SHARE_STEP_PCT for i, s in shares.items()):
            return None
        # Every share, also those that stay: one changed but not yet applied is reserved at its new value.
        return GpuSettings(sm_pct=shares)


def divide_sms(instances: list[tuple[tuple[int, ...], float]]) -> list[float]:
    """Whole-percent SM shares for instances given as (GPUs, need): each GPU's SMs divided among its
    residents in proportion to their needs (at least MIN_SHARE_PCT each, at most 100 in all).

    An instance spanning several GPUs takes the same share on each, the smallest its GPUs give it;
    it is settled first (widest first), and what it leaves on a GPU goes to that GPU's other residents.
    """
    left: dict[int, float] = {}
    unsettled: dict[int, float] = {}  # GPU -> summed needs of residents not yet given a share
    for gpus, need in instances:
        for g in gpus:
            left[g] = 100.0
            unsettled[g] = unsettled.get(g, 0.0) + max(need, 1e-9)
    shares = [0.0] * len(instances)
    for k in sorted(range(len(instances)), key=lambda k: -len(instances[k][0])):
        gpus, need = instances[k]
        need = max(need, 1e-9)
        share = min(left[g] * need / unsettled[g] for g in gpus)
        share = float(min(100, max(math.floor(MIN_SHARE_PCT), math.floor(share + 1e-9))))
        shares[k] = share
        for g in gpus:
            left[g] -= share
            unsettled[g] -= need
    return shares


def proportional_shares(needs: dict[int, float], budget: float, min_share: float) -> dict[int, float]:
    """Whole-percent shares proportional to ``needs``, each at least ``min_share``, summing to at most ``budget``."""
    fixed: dict[int, float] = {}
    while True:
        rest = budget - sum(fixed.values())
        open_ids = [k for k in needs if k not in fixed]
        total = sum(needs[k] for k in open_ids)
        alloc = {k: rest * (needs[k] / total if total > 0 else 1 / len(open_ids)) for k in open_ids}
        low = [k for k in open_ids if alloc[k] < min_share]
        if not low or len(low) == len(open_ids):  # the second cannot happen while budget >= min_share * n
            break
        fixed.update((k, min_share) for k in low)
    shares = {**fixed, **alloc}
    return {k: float(min(100, max(math.floor(min_share), math.floor(v)))) for k, v in shares.items()}

