"""The daemon tests serve through the simulated servers of tests/serve and share its fixtures.

``power_cluster`` is the live tests' own dev cluster (tests/daemon/test_e2e_slurm.py and
test_admin_guide_walk.py): four nodes that may all power down, on free ports, one per module so
one test's powered-off nodes and leftover jobs never meet another's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from festina_hpc.devcluster import DevClusterConfig, free_ports, missing_binaries
from festina_hpc.devcluster import down as devcluster_down
from festina_hpc.devcluster import up as devcluster_up
from tests.serve.conftest import store  # noqa: F401  (the shipped-profiles fixture)


def own_dev_cluster(name: str, ctld_port_from: int, **settings: Any) -> Iterator[DevClusterConfig]:
    """A four-node dev cluster of a test module's own (``name``, ports from ``ctld_port_from``), festina-node
    serving on each node unless ``festina_node=False``, torn down after it (festina-node included: ``down``
    stops it by its pid file); skips where Slurm is absent or we are not root."""
    if missing_binaries():
        pytest.skip(f"Slurm binaries absent ({', '.join(missing_binaries())})")
    if os.geteuid() != 0:
        pytest.skip("a dev cluster runs slurmd as root")
    base = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
    ctld = free_ports(1, start=ctld_port_from)
    slurmd = free_ports(4, start=ctld + 1)
    cfg = DevClusterConfig(base_dir=base, ctld_port=ctld, slurmd_port=slurmd, node_port=free_ports(4, start=slurmd + 4),
                           cluster_name=name, **settings)
    devcluster_up(cfg)
    try:
        yield cfg
    finally:
        devcluster_down(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def power_cluster() -> Iterator[DevClusterConfig]:
    yield from own_dev_cluster("festina-e2e", 21000, power_save_nodes=4, suspend_time_s=6)
