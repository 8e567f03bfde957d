"""Baseline policies: re-implementations of the mechanisms of the systems Festina is compared with.

Importing this package registers them.
"""

from festina_hpc.policy.baselines import dynamollm, llumnix, muxserve, serverlessllm, vllm  # noqa: F401
