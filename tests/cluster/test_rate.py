"""The arrival-rate meter (``festina_hpc.cluster.rate``) every driver counts arrivals with."""

from __future__ import annotations

import pytest

from festina_hpc.cluster.rate import RATE_HALF_LIFE_S, RateMeter, decayed_rate


def test_a_steady_stream_settles_at_its_rate() -> None:
    meter = RateMeter()
    for i in range(20 * 60 * 4):  # 4 per second for 20 half-lives
        meter.note(i / 4)
    assert meter.last_rate_per_s == pytest.approx(4.0, rel=0.01)
    assert meter.rate_per_s(20 * 60) == pytest.approx(4.0, rel=0.01)


def test_the_estimate_halves_each_half_life_without_arrivals() -> None:
    meter = RateMeter(now_s=100.0)
    meter.note(100.0)
    first = meter.rate_per_s(100.0)
    assert meter.rate_per_s(100.0 + RATE_HALF_LIFE_S) == pytest.approx(first / 2)
    assert meter.rate_per_s(100.0 + 3 * RATE_HALF_LIFE_S) == pytest.approx(first / 8)
    assert meter.last_rate_per_s == first  # what the last arrival left: it changes only with arrivals


def test_a_clock_that_goes_back_does_not_grow_the_rate() -> None:
    assert decayed_rate(2.0, since_s=50.0, now_s=10.0) == 2.0
    meter = RateMeter(now_s=50.0)
    meter.note(50.0)
    assert meter.rate_per_s(10.0) == meter.last_rate_per_s


def test_a_copy_counts_on_its_own() -> None:
    meter = RateMeter()
    meter.note(1.0)
    copy = meter.copy()
    assert copy.rate_per_s(5.0) == meter.rate_per_s(5.0)
    copy.note(2.0)
    assert copy.last_rate_per_s > meter.last_rate_per_s
    assert meter.rate_per_s(2.0) == decayed_rate(meter.last_rate_per_s, 1.0, 2.0)


def test_a_meter_can_start_from_an_estimate() -> None:
    meter = RateMeter(now_s=10.0, rate_per_s=3.0)
    assert meter.last_rate_per_s == 3.0
    assert meter.rate_per_s(10.0 + RATE_HALF_LIFE_S) == pytest.approx(1.5)
