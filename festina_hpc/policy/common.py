"""Building blocks the policies share: finding GPUs, predicting an instance's latency from the profiles."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Sequence

import numpy as np

from festina_hpc.policy.types import ClusterView, InstancePhase, InstanceView, NodePower
from festina_hpc.profiles.store import ProfileStore

# Context length assumed for latency predictions when a request's own is unknown.
TYPICAL_CONTEXT_TOKENS = 1024


def free_gpu_group(view: ClusterView, tp: int, nodes_first: Iterable[int] = (),
                   exclude: Collection[int] = ()) -> tuple[int, ...] | None:
    """``tp`` free GPUs on one node, or None: nodes in ``nodes_first`` first, then nodes that are
    on, then waking ones, each by id. Powered-off nodes and GPUs in ``exclude`` (already chosen
    by the same plan) are not considered.

    Walks the free GPUs lazily and stops at the first node that fits, so the cost does not grow
    with the cluster while free GPUs are plentiful.
    """
    for n in nodes_first:
        free = [g for g in view.node(n).gpus if not view.gpu(g).instances and g not in exclude]
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
    return None


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
    table = store.table(gpu_type, model)
    full, rest = divmod(max(1.0, tokens), PREFILL_CHUNK_TOKENS)
    time_s = 0.0
    if full:
        time_s += full * table.lookup("prefill", 1, PREFILL_CHUNK_TOKENS, sm_pct, clock_mhz, clamp=True).latency_s
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


class TokenStats:
    """Per-model running means of prompt and output lengths, learnt from the requests a policy places.

    A serving system knows its workload's length distribution from history, not a request's own
    output length; an exponentially weighted mean over past requests is that knowledge.
    """

    def __init__(self, weight: float = 0.05, prompt_tokens: float = TYPICAL_CONTEXT_TOKENS,
                 output_tokens: float = 256.0, window: int = 512):
        self.weight = weight
        self._initial = (prompt_tokens, output_tokens)
        self._means: dict[str, tuple[float, float]] = {}
        self._window = window
        self._prompts: dict[str, deque[int]] = {}
        self._quantiles: dict[tuple[str, float], tuple[int, float]] = {}  # (model, q) -> (count at, value)
        self._counts: dict[str, int] = {}

    def observe(self, model: str, prompt_tokens: int, output_tokens: int) -> None:
        prompt, output = self._means.get(model, self._initial)
        w = self.weight
        self._means[model] = (prompt + w * (prompt_tokens - prompt), output + w * (output_tokens - output))
        self._prompts.setdefault(model, deque(maxlen=self._window)).append(prompt_tokens)
        self._counts[model] = self._counts.get(model, 0) + 1

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
        return self._means.get(model, self._initial)[0]

    def output_tokens(self, model: str) -> float:
        return self._means.get(model, self._initial)[1]

    def decode_context_tokens(self, model: str) -> float:
        """Mean KV context of a decoding sequence: its prompt plus half its output."""
        prompt, output = self._means.get(model, self._initial)
        return prompt + output / 2
