"""The arrival-rate meter: requests per second, forgetting with a half-life.

One estimate for every driver: the simulator (per instance and per model), festinad's cluster view
(the same two) and the emulated engine (what its ``/health`` reports to festina-node) all count
arrivals with ``RateMeter``, so a policy sees the same rate for the same arrivals wherever it runs.
"""

from __future__ import annotations

import math

RATE_HALF_LIFE_S = 60.0  # arrival-rate estimates forget with this half-life
# What one arrival adds: with this weight a steady rate r settles at r (the integral of
# 2^(-t / half-life) over t >= 0 is half-life / ln 2).
_ARRIVAL_WEIGHT = math.log(2) / RATE_HALF_LIFE_S


def decayed_rate(rate: float, since_s: float, now_s: float) -> float:
    """``rate`` as it stood at ``since_s``, decayed to ``now_s`` (never grown by a clock that went back)."""
    return rate * 0.5 ** (max(0.0, now_s - since_s) / RATE_HALF_LIFE_S)


class RateMeter:
    """Arrivals per second, exponentially weighted with half-life ``RATE_HALF_LIFE_S``.

    ``RateMeter(now_s, rate_per_s)`` starts from an estimate made at ``now_s`` (none: 0);
    ``note(now_s)`` counts an arrival; ``rate_per_s(now_s)`` is the estimate decayed to ``now_s``;
    ``last_rate_per_s`` the estimate as the last arrival left it (what an instance reports: it
    changes only when a request arrives).
    """

    __slots__ = ("_rate_per_s", "_since_s")

    def __init__(self, now_s: float = 0.0, rate_per_s: float = 0.0):
        self._rate_per_s = rate_per_s  # the estimate as it stood at _since_s
        self._since_s = now_s

    def note(self, now_s: float) -> None:
        self._rate_per_s = decayed_rate(self._rate_per_s, self._since_s, now_s) + _ARRIVAL_WEIGHT
        self._since_s = now_s

    def rate_per_s(self, now_s: float) -> float:
        return decayed_rate(self._rate_per_s, self._since_s, now_s)

    @property
    def last_rate_per_s(self) -> float:
        return self._rate_per_s

    def copy(self) -> RateMeter:
        """An independent meter with this one's estimate (a replacement instance takes over its traffic)."""
        return RateMeter(self._since_s, self._rate_per_s)
