from __future__ import annotations

import pytest

from festina_hpc.node.attribution import split_energy


@pytest.mark.parametrize(("energy_j", "shares", "jobs", "idle_j"), [
    (100.0, {1: 40.0, 2: 60.0}, {1: 40.0, 2: 60.0}, 0.0),
    (90.0, {1: 30.0}, {1: 90.0}, 0.0),  # one job holds the GPU: its idle floor is its own
    (50.0, {}, {}, 50.0),  # no job: the idle pool
    (0.0, {1: 50.0, 2: 50.0}, {1: 0.0, 2: 0.0}, 0.0),
])
def test_split_by_sm_share(energy_j: float, shares: dict[int, float], jobs: dict[int, float], idle_j: float) -> None:
    got, idle = split_energy(energy_j, shares)
    assert got == pytest.approx(jobs)
    assert idle == pytest.approx(idle_j)
    assert sum(got.values()) + idle == pytest.approx(energy_j)


def test_negative_energy_is_refused() -> None:
    with pytest.raises(ValueError):
        split_energy(-1.0, {1: 50.0})
