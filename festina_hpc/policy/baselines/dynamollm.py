"""``dynamollm``: instance scaling plus, per GPU, the lowest clock that still meets the SLOs.

What is kept of DynamoLLM (Stojkovic et al., "DynamoLLM: Designing LLM
Inference Clusters for Performance and Energy Efficiency", HPCA'25):
instances own whole GPUs (no co-location) and the cluster re-configures to
the load at two levels. Instance count: a new instance starts when every
instance of the model is full (one more sequence would take its predicted
time between tokens past 80% of the TBT SLO), and one idle longer than the
keep-alive is stopped, except a model's last instance while the model had a
request within five keep-alives (DynamoLLM re-plans its instance pools over
minutes from load predictions, so a model still in use keeps warm capacity;
a model silent for that long goes to zero). Frequency: on every control
period, each GPU gets the lowest of the profile's tabulated clocks at which
the profile predicts that its instance's current batch (running + waiting,
at the model's mean decode context) steps within 80% of the TBT SLO and the
99th-percentile recent prompt prefills within 80% of the TTFT SLO
(DynamoLLM states its SLOs on P99 latencies; sizing for the mean prompt
instead misses TTFT for every long prompt). A clock that would break
either target is raised at once; otherwise the clock moves only when the new
one is at least two table steps away (hysteresis against re-locking the
clock on every batch change).

Simplified: DynamoLLM's per-request-type pools (short/medium/long prompts and
outputs, each with its own instances), its re-sharding of tensor parallelism
and its load predictor are not modelled: tensor parallelism is the model's
fixed degree, load is read as it is, and the clock choice is per instance
from its own batch rather than per pool.
"""

from __future__ import annotations

from bisect import bisect_left

from festina_hpc.policy.base import Policy, PolicyContext, register
from festina_hpc.policy.common import (
    TBT_PLANNING,
    TTFT_CONTROL,
    TokenStats,
    idle_for_s,
    place_on_whole_gpus,
    serving,
)
from festina_hpc.policy.types import (
    ClusterView,
    GpuSettings,
    GpuView,
    InstanceView,
    Placement,
    Plan,
    Request,
    StopInstance,
)

CLOCK_HYSTERESIS_STEPS = 2  # lower (or raise, when not forced) the clock only by this many table steps or more
PROMPT_QUANTILE = 0.99  # DynamoLLM states its SLOs on P99 latencies: the P99 prompt must prefill in time
LAST_INSTANCE_HOLD_KEEP_ALIVES = 5.0  # a model's last instance stays while it had a request this many keep-alives ago


@register
class DynamoLlmPolicy(Policy):
    name = "dynamollm"

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.stats = TokenStats()
        self.clocks_mhz = tuple(sorted(self.gpu_spec.table_clocks_mhz))  # ascending
        self._last_request_s: dict[str, float] = {}

    def place(self, request: Request, view: ClusterView) -> Placement:
        self.stats.observe(request.model, request.prompt_tokens, request.output_tokens)
        self._last_request_s[request.model] = view.now_s
        # Full is judged at max clock: control() raises the clock when a batch needs it.
        return place_on_whole_gpus(self.store, view, request, self.gpu_spec.max_clock_mhz)

    def scale(self, view: ClusterView) -> Plan:
        now_s = view.now_s
        keep_alive_s = self.context.keep_alive_s
        hold_s = LAST_INSTANCE_HOLD_KEEP_ALIVES * keep_alive_s
        stops: list[StopInstance] = []
        for model in view.models():
            live = serving(view.instances_of(model.name))
            idle = [i for i in live if idle_for_s(i, now_s) > keep_alive_s]
            keep_last = (len(idle) == len(live)
                         and now_s - self._last_request_s.get(model.name, -float("inf")) <= hold_s)
            for inst in sorted(idle, key=lambda i: -i.last_busy_s)[1 if keep_last else 0:]:
                stops.append(StopInstance(inst.id))
        return Plan(tuple(stops), reason="scale in idle instances" if stops else "")

    def meets_slo(self, inst: InstanceView, view: ClusterView, clock_mhz: int) -> bool:
        """Whether the instance's current batch and a typical prompt meet the latency targets at this clock."""
        slo = view.model(inst.model).slo
        table = self.store.table(view.gpu_type, inst.model)
        batch = max(1, inst.running + inst.waiting)
        context = self.stats.decode_context_tokens(inst.model)
        tbt_s = table.lookup("decode", batch, context, inst.sm_pct, clock_mhz, clamp=True).latency_s
        if tbt_s > TBT_PLANNING * slo.tbt_s:
            return False
        prompt = self.stats.prompt_quantile(inst.model, PROMPT_QUANTILE)
        prefill_s = table.lookup("prefill", 1, prompt, inst.sm_pct, clock_mhz, clamp=True).latency_s
        return prefill_s <= TTFT_CONTROL * slo.ttft_for(int(prompt))

    def lowest_clock_mhz(self, inst: InstanceView, view: ClusterView) -> int:
        """The lowest table clock meeting the targets (latency falls as the clock rises), else the highest."""
        lo, hi = 0, len(self.clocks_mhz) - 1
        if not self.meets_slo(inst, view, self.clocks_mhz[hi]):
            return self.clocks_mhz[hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self.meets_slo(inst, view, self.clocks_mhz[mid]):
                hi = mid
            else:
                lo = mid + 1
        return self.clocks_mhz[lo]

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings | None:
        instances = serving(view.instance(i) for i in gpu.instances)
        if not instances:
            return None
        inst = instances[0]  # whole GPUs: one instance per GPU
        target = self.lowest_clock_mhz(inst, view)
        current = gpu.clock_mhz
        if target == current:
            return None
        if target > current and not self.meets_slo(inst, view, current):
            return GpuSettings(clock_mhz=target)  # a target would break: raise at once
        if abs(self._step(target) - self._step(current)) >= CLOCK_HYSTERESIS_STEPS:
            return GpuSettings(clock_mhz=target)
        return None

    def _step(self, clock_mhz: int) -> int:
        """Index of the table clock nearest ``clock_mhz``."""
        i = bisect_left(self.clocks_mhz, clock_mhz)
        if i == len(self.clocks_mhz) or (i > 0 and clock_mhz - self.clocks_mhz[i - 1] < self.clocks_mhz[i] - clock_mhz):
            i -= 1
        return i
