"""Building blocks the policies share: finding GPUs, predicting an instance's latency from the profiles."""

from __future__ import annotations

from collections.abc import Iterable

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
