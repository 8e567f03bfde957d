"""Building blocks the policies share: finding GPUs, predicting an instance's latency from the profiles."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence

import numpy as np

from festina_hpc.policy.types import (
    Arrival,
    ClusterView,
    Drop,
    EndedRequest,
    Ending,
    InstancePhase,
    InstanceView,
    NodePower,
    Placement,
    Route,
    StartInstance,
)
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.profiles.table import ProfileTable

# Context length assumed for latency predictions when a request's own is unknown.
TYPICAL_CONTEXT_TOKENS = 1024


def empty_gpus_on(view: ClusterView, node: int, exclude: Collection[int] = ()) -> list[int]:
    """The node's GPUs that hold no instance, less those in ``exclude``, by id."""
    return [g for g in view.node(node).gpus if not view.gpu(g).instances and g not in exclude]


def free_gpu_group(view: ClusterView, tp: int, nodes_first: Iterable[int] = (),
                   exclude: Collection[int] = (), wake: bool = True) -> tuple[int, ...] | None:
    """``tp`` free GPUs on one node, or None: nodes in ``nodes_first`` first, then nodes that are
    on, then waking ones, each by id, then (with ``wake``) the GPUs of a node that is off, by id:
    a start there resumes it, as Slurm resumes a suspended node a job is sent to (with power
    saving, every node left idle is off after a while, and a policy that never woke one could no
    longer grow). GPUs in ``exclude`` (already chosen by the same plan) are not considered.

    Walks the free GPUs lazily and stops at the first node that fits, so the cost does not grow
    with the cluster while free GPUs are plentiful; only a cluster with no powered room left is
    looked over for a node that is off.
    """
    for n in nodes_first:
        free = empty_gpus_on(view, n, exclude)
        if len(free) >= tp and view.node(n).power is not NodePower.OFF:
            return tuple(free[:tp])
    waking: dict[int, list[int]] = {}
    node, group = -1, list[int]()
    for g in view.free_gpus():
        if g in exclude:
            continue
        n = view.gpu(g).node
        if view.node(n).power is not NodePower.ON:
            waking.setdefault(n, []).append(g)
            continue
        if n != node:
            node, group = n, []
        group.append(g)
        if len(group) == tp:
            return tuple(group)
    for group in waking.values():
        if len(group) >= tp:
            return tuple(group[:tp])
    if wake:
        for off in view.nodes():
            if off.power is NodePower.OFF:
                free = empty_gpus_on(view, off.id, exclude)
                if len(free) >= tp:
                    return tuple(free[:tp])
    return None


def waits_for_node(view: ClusterView, inst: InstanceView) -> bool:
    """A loading instance whose node is not on yet: it serves only after the node's resume (minutes)."""
    return inst.phase is InstancePhase.LOADING and view.node(inst.node).power is not NodePower.ON


def serving(instances: Iterable[InstanceView]) -> list[InstanceView]:
    """Instances that take new requests (loading or ready, not draining)."""
    return [i for i in instances if i.phase <= InstancePhase.READY]


def predicted_tbt_s(store: ProfileStore, gpu_type: str, inst: InstanceView, clock_mhz: int,
                    extra_sequences: int = 1, context_tokens: int = TYPICAL_CONTEXT_TOKENS) -> float:
    """Mean time between tokens if the instance held ``extra_sequences`` more sequences.

    A decode step at that batch, stretched by the prefills that interrupt decoding: with
    requests arriving at rate r and each prefill taking p seconds, decoding gets 1 - r p of the
    time (prefills of a typical prompt one at a time: an upper bound on their cost).
    """
    table = store.table(gpu_type, inst.model)
    batch = inst.running + inst.waiting + extra_sequences
    step_s = table.lookup("decode", batch, context_tokens, inst.sm_pct, clock_mhz, clamp=True).latency_s
    prefill_s = table.lookup("prefill", 1, context_tokens, inst.sm_pct, clock_mhz, clamp=True).latency_s
    decoding_share = max(0.05, 1.0 - inst.arrival_rate_per_s * prefill_s)
    return step_s / decoding_share


PREFILL_CHUNK_TOKENS = 2048  # prefill time of long queues is summed in chunks of this size


def prefill_time_s(store: ProfileStore, gpu_type: str, model: str, tokens: float, sm_pct: float,
                   clock_mhz: int) -> float:
    """Time to prefill ``tokens`` prompt tokens in chunks (as chunked prefill runs them)."""
    return chunked_prefill_s(store.table(gpu_type, model), tokens, sm_pct, clock_mhz)


def chunked_prefill_s(table: ProfileTable, tokens: float, sm_pct: float, clock_mhz: int,
                      chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> float:
    """Time to prefill ``tokens`` prompt tokens in steps of ``chunk_tokens``, from one table."""
    full, rest = divmod(max(1.0, tokens), chunk_tokens)
    time_s = 0.0
    if full:
        time_s += full * table.lookup("prefill", 1, chunk_tokens, sm_pct, clock_mhz, clamp=True).latency_s
    if rest:
        time_s += table.lookup("prefill", 1, rest, sm_pct, clock_mhz, clamp=True).latency_s
    return time_s


def sampled(candidates: Sequence[InstanceView], key: int, count: int = 2) -> list[InstanceView]:
    """Up to ``count`` distinct candidates chosen by ``key`` (a request id): deterministic, O(1).

    Power-of-two-choices routing: comparing two sampled instances balances load nearly as well
    as scanning all of them, at a cost that does not grow with the number of instances.
    """
    n = len(candidates)
    if n <= count:
        return list(candidates)
    first = (key * 2654435761) % n
    step = 1 + (key * 40503) % (n - 1)  # a non-zero offset: the second pick differs from the first
    return [candidates[(first + i * step) % n] for i in range(count)]


def least_loaded(instances: Iterable[InstanceView]) -> InstanceView | None:
    """The instance with the fewest sequences per batch slot (ties: the oldest)."""
    return min(instances, key=lambda i: (i.running + i.waiting) / i.batch_cap, default=None)


def idle_for_s(inst: InstanceView, now_s: float) -> float:
    """How long a ready instance has held no request (0 while it holds one or is not ready)."""
    if inst.phase is not InstancePhase.READY or inst.running or inst.waiting:
        return 0.0
    return max(0.0, now_s - inst.last_busy_s)


SHORT_OUTPUT_TOKENS = 8  # a request this short has too few steps to average a prefill step away
SHORT_OUTPUT_WEIGHT = 0.005  # the share is a mean over a few hundred requests (a share is noisier than a length)


class TokenStats:
    """Per-model running means of prompt and output lengths: prompts learnt from the requests a policy
    places, outputs from the requests that completed (``Policy.feedback``).

    A serving system knows its workload's length distribution from history, not a request's own
    output length; an exponentially weighted mean over past requests is that knowledge. A prompt
    is known at arrival; an output length only once the request completed, so the output half
    lags the prompt half by a request's service time.
    """

    def __init__(self, weight: float = 0.05, prompt_tokens: float = TYPICAL_CONTEXT_TOKENS,
                 output_tokens: float = 256.0, window: int = 512):
        self.weight = weight
        self._initial = (prompt_tokens, output_tokens)
        self._prompt_means: dict[str, float] = {}
        self._output_means: dict[str, float] = {}
        self._short: dict[str, float] = {}  # model -> share of requests with SHORT_OUTPUT_TOKENS or fewer
        self._window = window
        self._prompts: dict[str, deque[int]] = {}
        self._quantiles: dict[tuple[str, float], tuple[int, float]] = {}  # (model, q) -> (count at, value)
        self._counts: dict[str, int] = {}  # model -> prompts seen
        self._output_counts: dict[str, int] = {}  # model -> outputs seen

    def prime(self, model: str, prompt_tokens: float, output_tokens: float) -> None:
        """Start the model's mean lengths from figures known in advance instead of the prior."""
        self._prompt_means.setdefault(model, prompt_tokens)
        self._output_means.setdefault(model, output_tokens)

    def observe_prompt(self, model: str, prompt_tokens: int) -> None:
        """An arriving request's prompt (known at arrival)."""
        self._counts[model] = self._counts.get(model, 0) + 1
        prompt = self._prompt_means.get(model, self._initial[0])
        self._prompt_means[model] = prompt + self.weight * (prompt_tokens - prompt)
        self._prompts.setdefault(model, deque(maxlen=self._window)).append(prompt_tokens)

    def observe_output(self, model: str, output_tokens: int) -> None:
        """A completed request's true output length."""
        self._output_counts[model] = count = self._output_counts.get(model, 0) + 1
        output = self._output_means.get(model, self._initial[1])
        self._output_means[model] = output + self.weight * (output_tokens - output)
        # The share is the mean of every request seen until there are enough for its moving mean's
        # weight: it has no prior to start from.
        w = max(SHORT_OUTPUT_WEIGHT, 1.0 / count)
        short = self._short.get(model, 0.0)
        self._short[model] = short + w * ((output_tokens <= SHORT_OUTPUT_TOKENS) - short)

    def learn(self, done: Iterable[EndedRequest]) -> None:
        """The output lengths of the completed requests among ``done`` (``Policy.feedback``'s).

        A refused request generated nothing and a failed one was cut: neither tells how long the
        model's answers run, so both are left out.
        """
        for outcome in done:
            if outcome.ended is Ending.COMPLETED:
                self.observe_output(outcome.model, outcome.output_tokens)

    def prompt_quantile(self, model: str, q: float) -> float:
        """The ``q`` quantile of the model's recent prompt lengths (re-computed every 1/8 window of requests).

        Until an eighth of a window is seen, the prior typical prompt is a lower bound: a tail
        estimated from a handful of requests is too short.
        """
        count = self._counts.get(model, 0)
        cached = self._quantiles.get((model, q))
        if cached is not None and count - cached[0] < self._window // 8:
            return cached[1]
        prompts = self._prompts.get(model)
        value = float(np.quantile(np.fromiter(prompts, dtype=float), q)) if prompts else self._initial[0]
        if count < self._window // 8:
            value = max(value, self._initial[0])
        self._quantiles[(model, q)] = (count, value)
        return value

    def prompt_tokens(self, model: str) -> float:
        return self._prompt_means.get(model, self._initial[0])

    def output_tokens(self, model: str) -> float:
        return self._output_means.get(model, self._initial[1])

    def short_output_share(self, model: str) -> float:
        """The share of the model's requests that generate SHORT_OUTPUT_TOKENS or fewer: those whose
        mean time between tokens one long prefill step among their few can spoil."""
        return self._short.get(model, 0.0)

    def decode_context_tokens(self, model: str) -> float:
        """Mean KV context of a decoding sequence: its prompt plus half its output."""
        return self.prompt_tokens(model) + self.output_tokens(model) / 2


EXPECTED_OUTPUT_TOKENS = 512  # KV room a router sets aside per request (a typical max_tokens)
# Planning headroom, one for every policy (festina and the baselines alike), as shares of each SLO:
# placement judges an instance full when a request's predicted TTFT would pass TTFT_PLANNING of its
# TTFT SLO (the prediction already takes the queue ahead of it, a tail) or one more sequence would
# take the time between tokens past TBT_PLANNING of the TBT SLO (a mean, which the tail exceeds).
# A controller choosing a clock holds a load's typical prompt to TTFT_CONTROL of its TTFT SLO: the
# typical prompt is not the tail that arrives behind a long prefill.
TTFT_PLANNING = 1.0
TBT_PLANNING = 0.8
TTFT_CONTROL = 0.8


def has_room(store: ProfileStore, view: ClusterView, request: Arrival, inst: InstanceView, clock_mhz: int) -> bool:
    """Whether ``inst`` can take ``request`` within its SLOs' headroom, as a load-aware router judges it.

    KV room for its queue and the request (each queued one taken as this one's size; a router does
    not know output lengths), the queued prompts and this one prefilled within the TTFT SLO's
    headroom (a loading instance's queue waits for the load either way), and a time between
    tokens within the TBT SLO's headroom with one more sequence (``TTFT_PLANNING`` and ``TBT_PLANNING``).
    """
    slo = view.model(request.model).slo
    need = request.prompt_tokens + EXPECTED_OUTPUT_TOKENS
    if inst.kv_tokens_reserved + (inst.waiting + 1) * need > inst.kv_capacity_tokens:
        return False
    if inst.phase is InstancePhase.READY:
        prefill_s = prefill_time_s(store, view.gpu_type, inst.model, inst.pending_prompt_tokens + request.prompt_tokens,
                                   inst.sm_pct, clock_mhz)
        if prefill_s > TTFT_PLANNING * slo.ttft_for(request.prompt_tokens):
            return False
    return predicted_tbt_s(store, view.gpu_type, inst, clock_mhz) <= TBT_PLANNING * slo.tbt_s


def route_with_room(store: ProfileStore, view: ClusterView, request: Arrival, candidates: Sequence[InstanceView],
                    clock_mhz: int,
                    prefer: Callable[[Iterable[InstanceView]], InstanceView | None] | None = None
                    ) -> InstanceView | None:
    """A serving instance with room for the request, looking at O(1) of them: the ``prefer``red
    (default: least loaded) of two ready instances sampled by request id, else the newest (possibly
    still loading; one whose node is still resuming only while its model has no ready instance)."""
    choose = prefer or least_loaded
    ready = [i for i in candidates if i.phase is InstancePhase.READY]
    best = choose([i for i in sampled(ready, request.id) if has_room(store, view, request, i, clock_mhz)])
    if best is not None:
        return best
    newest = candidates[-1] if candidates else None
    if (newest is not None and not (ready and waits_for_node(view, newest))
            and has_room(store, view, request, newest, clock_mhz)):
        return newest
    return None


def place_on_whole_gpus(store: ProfileStore, view: ClusterView, request: Arrival, clock_mhz: int,
                        prefer: Callable[[Iterable[InstanceView]], InstanceView | None] | None = None) -> Placement:
    """The whole-GPU baselines' placement: an instance with room (``route_with_room``), else a new
    instance on free GPUs, else the least loaded instance (it queues), else a drop.

    A new instance on a node that is not on serves only after the node's resume (minutes): while
    one such start of the model is already under way, the request queues at the least loaded
    ready instance instead (as a router queues at the running replicas while the autoscaler's new
    one boots) rather than wait for the resume or wake yet another node."""
    candidates = serving(view.instances_of(request.model))
    target = route_with_room(store, view, request, candidates, clock_mhz, prefer)
    if target is not None:
        return Route(target.id)
    gpus = free_gpu_group(view, view.model(request.model).tp)
    if gpus is not None and view.node(view.gpu(gpus[0]).node).power is not NodePower.ON:
        ready = least_loaded(i for i in candidates if i.phase is InstancePhase.READY)
        if ready is not None and any(waits_for_node(view, i) for i in candidates):
            return Route(ready.id)
    if gpus is not None:
        return StartInstance(request.model, gpus)
    fallback = least_loaded(candidates)
    if fallback is not None:
        return Route(fallback.id)
    return Drop("no GPU free for a new instance")
