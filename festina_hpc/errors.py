"""The project's exception hierarchy.

Every error a user can cause (bad config, bad profile file, bad trace, unknown
model, lookup outside a table) is a ``FestinaError`` whose message is one line that
names the offending field and value; the CLI prints it and exits non-zero
without a traceback.
"""

from __future__ import annotations


class FestinaError(Exception):
    """Base class: a one-line, user-facing error."""


class ConfigError(FestinaError):
    """A config file key or value is invalid."""


class ProfileError(FestinaError):
    """A profile file is malformed, or a profile is missing."""


class UnknownProfileError(ProfileError):
    """No shipped profile for the GPU or model named."""


class OutOfProfileRange(ProfileError):
    """A lookup asked for a point outside the table's axes."""


class TraceError(FestinaError):
    """A workload input is invalid: a trace file, a model-mix file or a popularity spec."""


class GpuError(FestinaError):
    """A GPU backend operation failed."""


class GpuPermissionError(GpuError):
    """The operation needs privileges this process does not have."""


class GpuNotSupportedError(GpuError):
    """The GPU or driver does not support the operation."""


class GpuLostError(GpuError):
    """The GPU fell off the bus or is otherwise unusable."""
