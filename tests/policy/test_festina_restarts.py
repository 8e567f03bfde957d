"""festina's local control where a running instance's SM share is fixed (``live_share_change``
False, MPS's rule): clock and chunks at the shares the instances have, and few share restarts."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.policy.festina import SHARE_SETTLE_S, SHRINK_GAP_PCT
from festina_hpc.policy.types import InstancePhase
from festina_hpc.sim.cluster import SimInstance
from festina_hpc.sim.engine import Event
from tests.policy.conftest import STORE, FakeInstance, bursts
from tests.policy.test_festina import MAX_CLOCK_MHZ, MODEL, SLOS, SMALL_MODELS, CheckedSimulation, fake_view, festina


def test_an_instance_gives_back_a_share_only_after_needing_far_less_for_the_settle_time() -> None:
    view = fake_view()
    # Light, on a whole GPU's SMs; memory for a second copy (a restart keeps it serving).
    view.add(FakeInstance(0, MODEL, (0,), memory_fraction=0.4, running=4, arrival_rate_per_s=0.5))
    live = festina(live_share_change=True).control(view.gpu(0), view)
    assert live is not None and live.sm_pct  # where shares change in place, it shrinks at once
    policy = festina()
    first = policy.control(view.gpu(0), view)
    assert first is not None and not first.sm_pct  # the clock only
    view.now_s = SHARE_SETTLE_S - 1.0
    later = policy.control(view.gpu(0), view)
    assert later is None or not later.sm_pct
    view.now_s = SHARE_SETTLE_S
    settled = policy.control(view.gpu(0), view)
    assert settled is not None and settled.sm_pct[0] <= 100.0 - SHRINK_GAP_PCT


def test_no_restart_where_a_second_copy_does_not_fit_in_memory() -> None:
    """The instance would drain first and its requests wait for the drain and the load."""
    view = fake_view()
    view.add(FakeInstance(0, MODEL, (0,), memory_fraction=0.6, running=4, arrival_rate_per_s=0.5))
    policy = festina()
    for now_s in (0.0, SHARE_SETTLE_S, 2 * SHARE_SETTLE_S):
        view.now_s = now_s
        settings = policy.control(view.gpu(0), view)
        assert settings is None or not settings.sm_pct


def test_an_instance_short_at_its_share_grows_into_free_sms_once_per_settle_time() -> None:
    view = fake_view()
    inst = view.add(FakeInstance(0, MODEL, (0,), sm_pct=30, memory_fraction=0.5, running=16, waiting=2,
                                 arrival_rate_per_s=2.0))
    policy = festina()
    settings = policy.control(view.gpu(0), view)
    assert settings is not None and settings.clock_mhz == MAX_CLOCK_MHZ
    assert settings.sm_pct == {0: 100.0}  # the least share that keeps its SLOs: the GPU's free SMs allow it
    view.gpu(0).sm_pct_allocated = 60.0  # say another instance took SMs; the replacement is not up yet
    again = policy.control(view.gpu(0), view)
    assert again is None or not again.sm_pct
    view.now_s = SHARE_SETTLE_S
    grown = policy.control(view.gpu(0), view)
    assert grown is not None and grown.sm_pct == {inst.id: 70.0}  # all it can get: its 30 and the 40 free


class RestartLog(CheckedSimulation):
    """Logs each share restart by its model and GPUs (the place a replacement takes over)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.restarts: dict[tuple[str, tuple[int, ...]], list[float]] = defaultdict(list)

    def _restart(self, old: SimInstance, sm_pct: float) -> list[Event]:
        self.restarts[old.model, old.gpus].append(self._now)
        return super()._restart(old, sm_pct)


def test_bursts_do_not_make_the_controller_restart_an_instance_again_within_the_settle_time() -> None:
    """Three models in minute-long bursts four minutes apart, on whole GPUs: the controller gives
    back shares in the lulls and takes them again in bursts, each place at most once per
    SHARE_SETTLE_S. (The controller that changed shares at will restarted the same instance
    every few seconds: 326 restarts here, SLO attainment 0.42.)"""
    requests = bursts(np.random.default_rng(0), {m: 3.0 for m in SMALL_MODELS[:3]}, burst_s=60.0, gap_s=240.0,
                      count=4)
    sim = RestartLog(ClusterConfig(nodes=1, gpus_per_node=4), STORE, festina(), requests,
                     {m: SLOS[m] for m in SMALL_MODELS[:3]})
    result = sim.run()
    assert result.share_restarts == sum(len(times) for times in sim.restarts.values()) >= 1
    for place, times in sim.restarts.items():
        assert all(b - a >= SHARE_SETTLE_S for a, b in zip(times, times[1:])), (place, times)
    assert result.invalid_decisions == 0
    assert result.requests_completed == result.requests_total
    assert all(i.phase <= InstancePhase.DRAINING for i in sim.instances())


def test_two_instances_short_on_one_gpu_grow_only_into_the_sms_it_has_free() -> None:
    view = fake_view()
    for i in (0, 1):
        view.add(FakeInstance(i, MODEL, (0,), sm_pct=30, memory_fraction=0.3, running=16, waiting=2,
                              arrival_rate_per_s=2.0))
    settings = festina().control(view.gpu(0), view)
    assert settings is not None and settings.sm_pct
    assert sum(settings.sm_pct.values()) - 30.0 * len(settings.sm_pct) <= 40.0  # the 40 points free
