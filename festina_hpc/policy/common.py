"""Building blocks the policies share: finding GPUs, predicting an instance's latency from the profiles."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

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
