"""What the gateway measures per request, and the recorder protocol it hands each record to.

The database layer (``festina_hpc.db``) implements ``Recorder`` to persist
records; ``MemoryRecorder`` keeps them in a list for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol


class Outcome(StrEnum):
    OK = "ok"  # the stream finished ([DONE] seen)
    NO_INSTANCE = "no_instance"  # no instance within the scale-up timeout, or the policy dropped it (503)
    UPSTREAM_ERROR = "upstream_error"  # the instance failed, refused, or cut the stream (502, or a cut stream)
    CLIENT_GONE = "client_gone"  # the client hung up before the end
    GATEWAY_STOPPED = "gateway_stopped"  # festinad stopped (SIGTERM, restart) first: 503, or a stream's error event
    # Not an end: a checkpoint of a request still in flight (``Gateway.in_flight``), replaced by its final record.
    IN_FLIGHT = "in_flight"
    # festinad died (SIGKILL, a crash) first: its last checkpoint, recorded when festinad starts again.
    GATEWAY_CRASHED = "gateway_crashed"


@dataclass(frozen=True)
class CompletionRecord:
    """One completion request as the gateway saw it; times in seconds from its arrival at the gateway."""

    model: str
    arrival_unix_s: float
    outcome: Outcome
    status: int  # HTTP status the client got
    stream: bool
    endpoint: str | None  # base URL of the instance that served it
    instance_id: int | None
    prompt_tokens: int  # the instance's usage count when it sent one, else the gateway's approximation
    output_tokens: int
    ttft_s: float | None  # to the first token-bearing chunk
    tbt_mean_s: float | None  # (last token - first token) / (output tokens - 1)
    tbt_max_s: float | None  # the longest gap between consecutive token-bearing chunks
    e2e_s: float  # to the last byte sent
    route_s: float  # of which waiting for the router (scale from zero shows here)
    ttft_slo_s: float
    tbt_slo_s: float
    slo_met: bool  # OK, TTFT within its SLO and mean TBT within its SLO
    user_name: str = ""  # the tenant it is attributed to (its API key's, or the open gateway's default)
    account: str = ""
    api_key_id: int | None = None  # None: no key (an open gateway, or no authentication)
    request_id: str | None = None  # the gateway's id, given to a request once it is checkpointed in flight

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recorder(Protocol):
    def record(self, record: CompletionRecord) -> None:
        """Take one record. Called on the gateway's event loop after the response ended: it must not
        block (queue the write and flush elsewhere) and must not raise."""
        ...


class MemoryRecorder:
    """Keeps every record in order (tests, benchmarks)."""

    def __init__(self) -> None:
        self.records: list[CompletionRecord] = []

    def record(self, record: CompletionRecord) -> None:
        self.records.append(record)
