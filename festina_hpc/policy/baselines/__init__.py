"""Baseline policies: re-implementations of the mechanisms of the systems Festina is compared with.

Importing this package registers them.
"""

from festina_hpc.policy.baselines import vllm  # noqa: F401
