"""A small synchronous client of festinad's internal admin API (``festina_hpc/daemon/admin_api.py``).

The CLI asks festinad, not Slurm, to carry out what festinad owns (consolidation, draining a
model's instances), so the daemon's view and the database never disagree with what was done.
An error answer is raised as ``AdminApiError`` with festinad's own one-line message. Where
festinad requires keys, ``/admin/*`` needs an admin key: ``api_key`` goes in the Authorization
header and nowhere else (never into a message or a log).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from festina_hpc.errors import FestinaError


class AdminApiError(FestinaError):
    """festinad refused the request or did not answer."""


KEY_HINT = "the admin commands send $FESTINA_API_KEY or the key in --api-key-file"


def call(base_url: str, method: str, path: str, body: dict[str, Any] | None = None,
         timeout_s: float = 600.0, api_key: str | None = None) -> dict[str, Any]:
    """One JSON request to festinad; its JSON answer, or ``AdminApiError``."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", {}).get("message", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        hint = f" ({KEY_HINT})" if exc.code in (401, 403) else ""
        raise AdminApiError(f"festinad {base_url}: {message}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminApiError(f"festinad does not answer at {base_url} ({reason}): is `festina daemon` running? "
                            "(--festinad-url)") from None
