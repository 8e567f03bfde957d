"""The daemon tests serve through the simulated servers of tests/serve and share its fixtures."""

from __future__ import annotations

from tests.serve.conftest import store  # noqa: F401  (the shipped-profiles fixture)
