"""festinad's view of MPS room matches Slurm 22.05's: a node's MPS jobs all land on one GPU, Slurm's pick.

On the dev cluster (``Gres=gpu:h100:2,mps:200``) two MPS jobs of a node share GPU 0 while GPU 1 stays
empty, and a second mps:100 job on a node with two free GPUs pends: an MPS share can go only where the
node's MPS jobs already are (or, with none yet, where Slurm puts the first). ``LiveCluster.slurm_fit``
carries a policy's start out accordingly; festinad's reconcile moves an instance to the GPU its job's
allocated GRES index names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from festina_hpc.daemon.gateway import gateway_models
from festina_hpc.daemon.policy_router import LiveCluster, runs_as_mps
from festina_hpc.daemon.routing import NoInstance
from festina_hpc.policy.types import StartInstance
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.slurm.parse import gres_indices, parse_squeue_json
from tests.serve.conftest import GPU, MODEL
from tests.slurm.conftest import SAMPLES


def in_loop(test: Callable[[LiveCluster], None], store: ProfileStore, gpus_per_node: int = 2) -> None:
    """Run ``test`` on a fresh one-node view inside an event loop (instances hold futures)."""
    async def main() -> None:
        slos = {m.name: m.slo for m in gateway_models(store, GPU, [MODEL])}
        test(LiveCluster(store, GPU, slos, nodes=1, gpus_per_node=gpus_per_node))
    asyncio.run(main())


def share(gpu: int, sm_pct: float = 40.0, memory_fraction: float = 0.3) -> StartInstance:
    return StartInstance(MODEL, (gpu,), sm_pct=sm_pct, memory_fraction=memory_fraction)


@pytest.mark.parametrize(("tp", "sm_pct", "mps"), [(1, 40.0, True), (1, 99.4, True), (1, 99.6, False),
                                                    (1, 100.0, False), (2, 50.0, False)])
def test_what_runs_as_an_mps_share(tp: int, sm_pct: float, mps: bool) -> None:
    assert runs_as_mps(tp, sm_pct) is mps


def test_the_first_share_of_an_empty_node_goes_where_slurm_puts_it(store: ProfileStore) -> None:
    def check(view: LiveCluster) -> None:
        assert view.mps_gpu(0) == 0  # Slurm's pick on an empty node: the lowest GPU
        assert view.slurm_fit(share(1)) == share(0)  # both empty: the same to the policy, and Slurm's
        whole = StartInstance(MODEL, (1,))
        assert view.slurm_fit(whole) is whole  # gpu gres: festina names the node, any free GPU does
    in_loop(check, store)


def test_shares_follow_the_gpu_slurm_gave_the_first_one(store: ProfileStore) -> None:
    def check(view: LiveCluster) -> None:
        first = view.add(share(0), 1)
        view.move(first, (1,))  # its job's GRES said IDX:1
        assert view.mps_gpu(0) == 1
        assert [g.sm_pct_allocated for g in view.gpus()] == [0.0, 40.0]
        assert view.slurm_fit(share(1)) == share(1)  # beside it: as asked
        # An empty GPU other than the node's MPS GPU: Slurm would not put a share there, so the instance
        # runs alone on it as a whole GPU (gpu:1), as the policy meant it to be alone there.
        promoted = view.slurm_fit(share(0))
        assert promoted == StartInstance(MODEL, (0,), sm_pct=100.0, memory_fraction=0.3)
        assert not runs_as_mps(1, promoted.sm_pct)
    in_loop(check, store)


def test_a_share_meant_for_another_busy_gpu_moves_to_the_mps_gpu_or_is_refused(store: ProfileStore) -> None:
    def check(view: LiveCluster) -> None:
        view.add(share(0, sm_pct=60.0), 1)
        view.add(share(1, sm_pct=20.0), 2)  # a stale view: two GPUs with shares; the fuller is Slurm's
        assert view.mps_gpu(0) == 0
        assert view.slurm_fit(share(1, sm_pct=30.0)) == share(0, sm_pct=30.0)
        with pytest.raises(NoInstance, match="Slurm puts MPS jobs of node 0 on GPU 0, which has no room"):
            view.slurm_fit(share(1, sm_pct=50.0))
    in_loop(check, store)


def test_a_node_held_by_whole_gpus_has_no_mps_gpu(store: ProfileStore) -> None:
    def check(view: LiveCluster) -> None:
        view.add(StartInstance(MODEL, (0,), memory_fraction=0.5), 1)
        assert view.mps_gpu(0) == 1
        view.add(StartInstance(MODEL, (1,), memory_fraction=0.5), 2)
        assert view.mps_gpu(0) is None
    in_loop(check, store)


def test_an_adopted_mps_100_job_is_a_share(store: ProfileStore) -> None:
    def check(view: LiveCluster) -> None:
        inst: Any = view.add(StartInstance(MODEL, (1,), memory_fraction=0.3), 1, shared=True)
        assert inst.shared and view.mps_gpu(0) == 1  # its GPU is the node's MPS GPU, full
        with pytest.raises(NoInstance, match="overfilled GPU 1"):
            view.check(view.slurm_fit(share(1)))
        assert view.slurm_fit(share(0)).sm_pct == 100.0  # the other GPU: only as a whole GPU
    in_loop(check, store)


def test_the_view_agrees_with_slurm_on_captured_jobs(store: ProfileStore) -> None:
    # squeue --json on the dev cluster (a node of two GPUs): mps:30, gpu:1, mps:30, then mps:50. Slurm put both
    # shares on GPU 0 and the whole GPU on GPU 1; the mps:50 pends ("Resources"): GPU 0 has 40 left and GPU 1
    # is held as a whole GPU.
    jobs = parse_squeue_json((SAMPLES / "devcluster_squeue_mps_one_gpu.json").read_text())

    def check(view: LiveCluster) -> None:
        for job in jobs:
            if job.state != "RUNNING":
                continue
            given = gres_indices(job.gres_detail[0])
            mps = sum(g.count for g in job.gres if g.name == "mps")
            gpus = given.get("mps") or given.get("gpu") or ()
            view.add(StartInstance(MODEL, gpus, sm_pct=float(mps or 100), memory_fraction=0.3), job.job_id)
        assert view.mps_gpu(0) == 0
        (pending,) = [j for j in jobs if j.state == "PENDING"]
        assert pending.reason == "Resources" and pending.gres[0].count == 50
        for asked in (0, 1):  # wherever the policy asks it, festinad does not submit what Slurm would pend
            with pytest.raises(NoInstance):
                view.check(view.slurm_fit(share(asked, sm_pct=50.0, memory_fraction=0.05)))
        assert view.slurm_fit(share(1, sm_pct=40.0, memory_fraction=0.05)).gpus == (0,)  # what Slurm would run
    in_loop(check, store)
