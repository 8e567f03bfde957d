"""A small synchronous client of festinad's internal admin API (``festina_hpc/daemon/admin_api.py``).

The CLI asks festinad, not Slurm, to carry out what festinad owns (consolidation, draining a
model's instances), so the daemon's view and the database never disagree with what was done.
An error answer is raised as ``AdminApiError`` with festinad's own one-line message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from festina_hpc.errors import FestinaError


class AdminApiError(FestinaError):
    """festinad refused the request or did not answer."""


def call(base_url: str, method: str, path: str, body: dict[str, Any] | None = None,
         timeout_s: float = 600.0) -> dict[str, Any]:
    """One JSON request to festinad; its JSON answer, or ``AdminApiError``."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", {}).get("message", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise AdminApiError(f"festinad {base_url}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminApiError(f"festinad does not answer at {base_url} ({reason}): is `festina daemon` running? "
                            "(--festinad-url)") from None
