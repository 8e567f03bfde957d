"""``muxserve``: several models share a GPU through MPS, each with an SM share and memory sized to its load.

What is kept of MuxServe (Duan et al., "MuxServe: Flexible Spatial-Temporal
Multiplexing for Multiple LLM Serving", ICML'24): models are co-located on
the same GPUs (a "unit" of ``tp`` GPUs on one node) and share their compute
spatially through MPS, each instance holding an SM share and a slice of
memory (weights plus a KV-cache quota) sized to its workload; clocks stay at
the default (max). A model's need is the SM share that serves its arrival
rate at 70% utilisation, computed from the profile tables (per-request GPU
time at a full GPU: one prefill of a typical prompt plus its decode steps at
the largest batch whose time between tokens stays within 80% of the SLO),
and never below the smallest share at which a typical prompt's prefill and a
decode step meet 80% of the TTFT and TBT SLOs. A new instance joins GPUs
already in use whose memory and summed needs leave room for it, the tightest
such fit first, else takes free GPUs. ``control`` re-divides each GPU's SMs
among its instances in proportion to their needs at their recent arrival
rates (at least 10% each, summing to at most 100), keeping 10% back while
the GPU still has memory for another model. Instances stay warm (MuxServe
serves a fixed set of models); a model whose instances are all full (SLO or
KV quota) gets another one.

Simplified: MuxServe's offline placement (enumerating GPU meshes and model
groups to maximise throughput for rates known in advance) becomes this
online greedy best fit with rates measured as requests arrive, so an early
instance is sized for a small load and later ones for the measured one.
Its adaptive batch scheduling, which interleaves prefill and decode jobs of
co-located models and moves KV-cache blocks between their quotas, is reduced
to fixed memory quotas (set at start: no resize action exists) and SM shares
re-sized each control period; the simulator runs co-located instances
concurrently, each at its share.
"""

from __future__ import annotations

import math

from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import SLO_HEADROOM, TokenStats, free_gpu_group, least_loaded, predicted_tbt_s, serving
from festina_hpc.policy.types import (
    ClusterView,
    Drop,
    GpuSettings,
    GpuView,
    InstancePhase,
    Placement,
    Request,
    Route,
    StartInstance,
)
from festina_hpc.profiles.table import AXES

TARGET_UTILIZATION = 0.7  # an SM share is sized so the model's load keeps it this busy
MIN_SHARE_PCT = 10.0  # MPS shares below this starve an instance
SHARE_STEP_PCT = 5.0  # re-size shares only when one moves by at least this much
USABLE_MEMORY_FRAC = 0.9  # of GPU memory for weights and KV cache (vLLM's gpu_memory_utilization)
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
        ttft_limit_s, tbt_limit_s = SLO_HEADROOM * info.slo.ttft_s, SLO_HEADROOM * info.slo.tbt_s

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

    # -- placing -----------------------------------------------------------------------------------

    def place(self, request: Request, view: ClusterView) -> Placement:
        self.stats.observe(request.model, request.prompt_tokens, request.output_tokens)
        model = view.model(request.model)
        candidates = serving(view.instances_of(request.model))
        limit_s = SLO_HEADROOM * model.slo.tbt_s
        seq_tokens = self.stats.prompt_tokens(request.model) + self.stats.output_tokens(request.model)
        roomy = [i for i in candidates
                 if predicted_tbt_s(self.store, view.gpu_type, i, self.gpu_spec.max_clock_mhz,
                                    context_tokens=round(self.stats.decode_context_tokens(request.model)))
                 <= limit_s
                 and i.kv_tokens_reserved + (i.waiting + 1) * seq_tokens <= i.kv_capacity_tokens]
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
        if not self.context.live_share_change and any(
                view.instance(i).phase is not InstancePhase.READY for i in gpu.instances):
            # A share change restarts the instance: one loading keeps the share it started with,
            # and a GPU is re-divided only once a restart (or a start) beside it has finished.
            return None
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

