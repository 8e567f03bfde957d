"""The benchmark's cluster state (``festina_hpc.sim.policy_bench``): busy but within every GPU's limits."""

from __future__ import annotations

import numpy as np
import pytest

from festina_hpc.policy.types import InstancePhase
from festina_hpc.sim.policy_bench import NODE_LAYOUTS, build_state, run_policy_bench
from tests.policy.conftest import STORE, make_policy_for


def test_the_state_is_loaded_and_within_limits() -> None:
    sim = build_state(STORE, make_policy_for("festina"), 48, np.random.default_rng(0))
    assert len(sim.live) == 2 * sum(len(layout) for layout in NODE_LAYOUTS)
    assert len({i.model for i in sim.instances()}) == 8
    for gpu in sim.gpus():
        assert gpu.sm_pct_allocated <= 100 and gpu.memory_fraction_allocated <= 1
    assert sum(1 for g in sim.gpus() if len(g.instances) > 1) >= 6  # co-located pairs
    assert sum(1 for g in sim.gpus() if not g.instances) == 4  # spare GPUs
    for inst in sim.instances():
        assert inst.phase is InstancePhase.READY
        assert inst.kv_tokens_reserved <= inst.kv_capacity_tokens
    assert sum(i.running for i in sim.instances()) > 0 and sum(i.waiting for i in sim.instances()) > 0


@pytest.mark.parametrize("gpus", [0, 12])
def test_sizes_are_whole_nodes(gpus: int) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        build_state(STORE, make_policy_for("festina"), gpus, np.random.default_rng(0))


def test_every_size_gets_figures_and_control_is_timed_once() -> None:
    result = run_policy_bench(STORE, "festina", [8, 24], decisions=50)
    assert [s.gpus for s in result.sizes] == [8, 24]
    assert all(len(s.place_ns) == 50 and sum(s.outcomes.values()) == 50 for s in result.sizes)
    # At the largest size only: 22 of its 24 GPUs hold instances (more if placement started some).
    assert 22 <= result.control_gpus <= 24 and len(result.control_ns) == result.control_gpus
