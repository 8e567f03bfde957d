"""Building blocks the policies share: finding GPUs, predicting an instance's latency from the profiles."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from festina_hpc.policy.types import ClusterView, InstancePhase, InstanceView, NodePower
from festina_hpc.profiles.store import ProfileStore

# Context length assumed for latency predictions when a request's own is unknown.
TYPICAL_CONTEXT_TOKENS = 1024


def free_gpu_group(view: ClusterView, tp: int, nodes_first: Iterable[int] = ()) -> tuple[int, ...] | None:
    """``tp`` free GPUs on one node (nodes in ``nodes_first`` tried first, then by id), or None.

    Nodes that are on are preferred over waking ones; powered-off nodes are not considered.
    """
    by_node: dict[int, list[int]] = {}
    for g in view.free_gpus():
        by_node.setdefault(view.gpu(g).node, []).append(g)
    preferred = [n for n in nodes_first if n in by_node]
    order = preferred + sorted((n for n in by_node if n not in preferred),
                               key=lambda n: (view.node(n).power is not NodePower.ON, n))
    for n in order:
        if len(by_node[n]) >= tp:
            return tuple(by_node[n][:tp])
    return None


def serving(instances: Iterable[InstanceView]) -> list[InstanceView]:
    """Instances that take new requests (loading or ready, not draining)."""
    return [i for i in instances if i.phase <= InstancePhase.READY]


def predicted_tbt_s(store: ProfileStore, gpu_type: str, inst: InstanceView, clock_mhz: int,
                    extra_sequences: int = 1, context_tokens: int = TYPICAL_CONTEXT_TOKENS) -> float:
    """Decode step time if the instance held ``extra_sequences`` more sequences."""
    table = store.table(gpu_type, inst.model)
    batch = inst.running + inst.waiting + extra_sequences
    return table.lookup("decode", batch, context_tokens, inst.sm_pct, clock_mhz, clamp=True).latency_s


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
