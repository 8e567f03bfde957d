"""The gateway's router protocol: which instance endpoint serves a request, starting one when needed.

A router may take time (scale from zero: an instance must start and load);
the gateway bounds the wait and answers 503 with Retry-After when it runs
out. ``StaticRouter`` serves fixed endpoints round-robin (tests, benchmarks,
a site without festinad scheduling); ``daemon/policy_router.py`` asks the
policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from festina_hpc.errors import FestinaError


@dataclass(frozen=True)
class Endpoint:
    """A serving instance's base URL (``http://host:port``), when the router tracks it its id, and the secret
    the instance answers only with (``serve/secret.py``; None: an open instance)."""

    url: str
    instance_id: int | None = None
    secret: str | None = field(default=None, repr=False)  # repr=False: an endpoint in a log shows no secret

    def auth_headers(self) -> dict[str, str]:
        """The headers that let a request in."""
        return {"Authorization": f"Bearer {self.secret}"} if self.secret else {}


class NoInstance(FestinaError):
    """The router cannot give an endpoint now (the policy dropped the request, or a start failed).

    A verdict, not an internal failure: the gateway answers 503 with Retry-After.
    """


class Router(Protocol):
    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        """An endpoint serving ``model`` (festina's canonical name); may wait for an instance to start.

        Raises ``NoInstance`` when there is none to give. The gateway cancels the call at its
        timeout, so a start must continue on its own (a later request finds the instance).
        """
        ...

    def done(self, endpoint: Endpoint) -> None:
        """The request ``route`` answered with ``endpoint`` has ended (successfully or not)."""
        ...

    def failed(self, endpoint: Endpoint) -> None:
        """The gateway could not reach ``endpoint`` before any byte of its answer (connection refused or reset,
        or closed before the response headers): route no more requests there until it is known to serve.

        Called before ``done`` for the same request; the gateway then asks ``route`` again (a bounded
        number of times, within its ``scale_timeout_s``), so a router should give another endpoint, or
        wait, as for a cold start, for this one to be replaced. Must be cheap and must not raise.
        """
        ...


class StaticRouter:
    """Fixed endpoints per model, round-robin; ``secret``: the one their servers answer only with.

    ``failed`` does nothing: the next ``route`` gives the next URL of the cycle anyway, and a fixed
    endpoint has no replacement to wait for."""

    def __init__(self, endpoints: Mapping[str, Sequence[str]], secret: str | None = None):
        self._cycles: dict[str, Iterator[str]] = {m: itertools.cycle(urls) for m, urls in endpoints.items() if urls}
        self._secret = secret

    async def route(self, model: str, prompt_tokens: int) -> Endpoint:
        cycle = self._cycles.get(model)
        if cycle is None:
            raise NoInstance(f"no endpoint serves {model}")
        return Endpoint(next(cycle), secret=self._secret)

    def done(self, endpoint: Endpoint) -> None:
        pass

    def failed(self, endpoint: Endpoint) -> None:
        pass
