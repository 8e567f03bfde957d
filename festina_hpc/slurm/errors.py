"""Errors of the Slurm client: a command that failed, and input refused before any command ran.

Both are ``FestinaError``s with one-line messages, so the CLI prints them as
``festina: error: ...``. They live here rather than in ``festina_hpc.errors``
because only this package raises them.
"""

from __future__ import annotations

from collections.abc import Sequence

from festina_hpc.errors import FestinaError


class SlurmError(FestinaError):
    """A Slurm operation failed."""


class SlurmInputError(SlurmError):
    """A job id, node name, reason or job spec was refused before building any command."""


class SlurmCommandError(SlurmError):
    """A Slurm command exited non-zero, timed out, could not be started, or printed output we cannot read."""

    def __init__(self, argv: Sequence[str], message: str, returncode: int | None = None, stderr: str = "") -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = " ".join(stderr.split())  # one line, whatever Slurm printed
        text = f"{' '.join(self.argv)}: {message}"
        if detail:
            text += f": {detail[:500]}"
        super().__init__(text)


class SlurmNotFoundError(SlurmError):
    """The job or node asked for does not exist (any more)."""
