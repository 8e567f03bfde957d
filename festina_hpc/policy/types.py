"""The data that flows between a driver (simulator or daemon) and a policy.

Requests and SLOs come in; decisions go out as frozen dataclasses: where a
request goes (``Route``, ``Start``, ``Drop``), what a GPU's settings are
(``GpuSettings``), and what the cluster should change (a ``Plan`` of
actions). The read side is a set of small protocols (``ClusterView`` and the
views it hands out) that the driver implements over its own live state, so a
policy never copies the cluster and never mutates it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


@dataclass(frozen=True)
class Request:
    """One inference request: a prompt of ``prompt_tokens`` that generates ``output_tokens``."""

    id: int
    arrival_s: float
    model: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Slo:
    """Per-model service level: time to first token, and mean time between the request's tokens."""

    ttft_s: float
    tbt_s: float
