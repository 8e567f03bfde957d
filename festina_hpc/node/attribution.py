"""Energy attribution on a shared GPU: how a measured counter delta is split among the jobs on it.

The rule (documented in the README too): the node settles each GPU's energy
counter at every event that changes who runs on it (a prolog, an epilog) and on
every control tick. Between two settlements the set of jobs and their SM
shares is constant, so the delta of that interval is split among the jobs
present in proportion to their SM share (MPS active-thread percentage; a
whole-GPU job counts 100). Over a job's life this is its SM share times its
active time, weighted by what the GPU actually drew. The GPU's idle power
while jobs hold it belongs to those jobs (they hold the allocation, and share
the idle floor by share); an interval with no job at all goes to the GPU's
idle pool, which is kept per GPU and never charged to a job. Hence, exactly:
sum over jobs + idle pool = counter delta.
"""

from __future__ import annotations

from collections.abc import Mapping


def split_energy(energy_j: float, shares: Mapping[int, float]) -> tuple[dict[int, float], float]:
    """(energy per job id, energy to the idle pool) of one interval with the given SM shares."""
    if energy_j < 0:
        raise ValueError(f"energy_j = {energy_j!r} must not be negative")
    weights = {job: max(0.0, share) for job, share in shares.items()}
    total = sum(weights.values())
    if total <= 0:
        return {job: 0.0 for job in shares}, energy_j
    return {job: energy_j * w / total for job, w in weights.items()}, 0.0
