"""Errors of festina-node: bad hook input, a refused caller, and node-side failures.

All are ``FestinaError``s with one-line messages. The hooks catch every one of
them and exit 0 (fail open); only ``GpuLostError`` from the GPU layer drains a node.
"""

from __future__ import annotations

from festina_hpc.errors import FestinaError


class NodeError(FestinaError):
    """A festina-node operation failed."""


class NodeInputError(NodeError):
    """A value from the hook environment, a request or the config was refused."""


class AccessDenied(NodeError):
    """A caller of the control socket is neither root nor the festina service user."""
