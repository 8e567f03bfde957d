"""Load sweeps: ratios taken per workload, the operating scale, and the files a sweep writes."""

from __future__ import annotations

import pytest

from festina_hpc.sim.sweep import Point, Sweep, headline


def point(scale: float, seed: int, policy: str, kwh: float, slo: float) -> Point:
    return Point(scale, seed, policy, kwh * 3.6e6, slo, 0, {})


def sweep(points: list[Point], target: float = 0.99) -> Sweep:
    bounds = {(p.rate_scale, p.seed): 0.5 * 3.6e6 for p in points}
    return Sweep(points, bounds, "vllm", target, {})


def test_energy_relative_to_the_reference_is_taken_per_workload_then_averaged() -> None:
    """Seed 0 is a light draw, seed 1 a heavy one: the mean of the per-seed ratios (0.5 and 0.9)
    is 0.7; the ratio of the mean energies would be 5.5/9 = 0.61, weighting the heavy draw."""
    s = sweep([point(1.0, 0, "vllm", 2.0, 1.0), point(1.0, 0, "festina", 1.0, 0.995),
               point(1.0, 1, "vllm", 16.0, 0.99), point(1.0, 1, "festina", 14.4, 0.993)])
    festina = next(r for r in s.summaries() if r.policy == "festina")
    assert festina.x_reference_mean == pytest.approx(0.7)
    assert (festina.x_reference_min, festina.x_reference_max) == pytest.approx((0.5, 0.9))
    assert festina.energy_kwh_mean == pytest.approx(7.7)
    assert festina.slo_mean == pytest.approx(0.994) and festina.slo_min == pytest.approx(0.993)
    assert festina.x_bound_mean == pytest.approx((2.0 + 28.8) / 2)


def test_the_operating_scale_is_the_busiest_where_a_baseline_meets_the_target_on_average() -> None:
    """At 2 the best baseline (muxserve) averages 0.99 over the seeds; at 4 it does not, although
    one seed does; Festina's attainment plays no part."""
    points = []
    for scale, slos in ((1.0, (0.999, 0.998)), (2.0, (0.985, 0.995)), (4.0, (0.992, 0.95))):
        for seed, slo in enumerate(slos):
            points += [point(scale, seed, "vllm", 2.0, slo - 0.01), point(scale, seed, "muxserve", 1.8, slo),
                       point(scale, seed, "festina", 1.0, 1.0)]
    s = sweep(points)
    assert s.operating_scale() == 2.0
    lines = headline(s)
    assert lines[0].startswith("Operating rate scale 2:") and "(muxserve)" in lines[0]
    assert lines[1].startswith("festina: 0.500x vllm") and "0.556x muxserve" in lines[1]
    assert sweep(points, target=0.9995).operating_scale() is None
    assert "no operating point" in headline(sweep(points, target=0.9995))[0]
