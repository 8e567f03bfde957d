"""The job watcher: every job waited on is looked up in one Slurm call a period; each waiter wakes with its job.

The lookup is a counting fake of ``SlurmClient.get_jobs`` and the watcher's
sleep waits for the test to let a period pass, so no real time passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from festina_hpc.daemon.job_watcher import JobWatcher
from festina_hpc.slurm.errors import SlurmCommandError
from festina_hpc.slurm.types import SlurmJob


def job(job_id: int, state: str = "PENDING") -> SlurmJob:
    return SlurmJob(job_id, "festina", state, "Resources", (), (), (), "", "svc", "", "gpu")


class Slurm:
    """What slurmctld holds; ``lookups`` records the ids of each ``get_jobs`` call (one entry a call)."""

    def __init__(self, *jobs: SlurmJob) -> None:
        self.jobs = {j.job_id: j for j in jobs}
        self.lookups: list[tuple[int, ...]] = []
        self.fail = False

    async def get_jobs(self, job_ids: Sequence[int]) -> Mapping[int, SlurmJob]:
        self.lookups.append(tuple(job_ids))
        if self.fail:
            raise SlurmCommandError(["scontrol", "-o", "show", "job"], "timed out after 30 s")
        return {i: self.jobs[i] for i in job_ids if i in self.jobs}

    def set(self, job_id: int, state: str) -> None:
        self.jobs[job_id] = replace(self.jobs[job_id], state=state)


class Periods:
    """The watcher's sleep: returns only when the test lets a period pass (``tick``)."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self._gate = asyncio.Event()
        self._sleeping = False

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self._sleeping = True
        await self._gate.wait()
        self._gate.clear()
        self._sleeping = False

    async def tick(self, periods: int = 1) -> None:
        """Let ``periods`` pass: each ends the sleep of a watcher that sleeps (none sleeps: time passes idle)."""
        for _ in range(periods):
            await settle()
            if self._sleeping:
                self._gate.set()
            await settle()


async def settle() -> None:
    """Let every ready task run (the watcher's round, the waiters it woke)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_n_starting_jobs_are_one_lookup_a_period_not_n() -> None:
    async def main() -> None:
        slurm, periods = Slurm(*(job(i) for i in range(100, 105))), Periods()
        watcher = JobWatcher(slurm.get_jobs, 1.0, sleep=periods.sleep)
        waits = [asyncio.ensure_future(watcher.wait(i, {"RUNNING"})) for i in range(100, 105)]
        await periods.tick(3)
        # The first round at once, then one a period: 4 calls for 5 jobs over 3 periods, each asking for all.
        assert slurm.lookups == [(100, 101, 102, 103, 104)] * 4
        assert periods.slept == [1.0] * 4 and not any(w.done() for w in waits)
        for i in range(100, 105):
            slurm.set(i, "RUNNING")
        await periods.tick()
        assert [w.result().state for w in waits] == ["RUNNING"] * 5  # type: ignore[union-attr]
        assert len(slurm.lookups) == 5 and watcher.rounds == 5 and watcher.watched == frozenset()
        await watcher.close()

    asyncio.run(main())


def test_a_job_that_runs_wakes_its_waiter_and_only_it() -> None:
    async def main() -> None:
        slurm, periods = Slurm(job(1), job(2)), Periods()
        watcher = JobWatcher(slurm.get_jobs, 0.5, sleep=periods.sleep)
        first, second = (asyncio.ensure_future(watcher.wait(i, {"RUNNING"})) for i in (1, 2))
        await settle()
        slurm.set(1, "RUNNING")
        await periods.tick()
        assert first.done() and first.result() == slurm.jobs[1] and not second.done()
        await periods.tick()
        assert slurm.lookups[-1] == (2,)  # the job that runs is no longer asked about
        await watcher.close()
        await settle()
        assert second.cancelled()

    asyncio.run(main())


def test_a_job_that_ends_or_vanishes_wakes_its_waiter_with_why() -> None:
    async def main() -> None:
        slurm, periods = Slurm(job(1, "RUNNING"), job(2, "RUNNING")), Periods()
        watcher = JobWatcher(slurm.get_jobs, 0.5, sleep=periods.sleep)
        failed, gone = (asyncio.ensure_future(watcher.wait(i)) for i in (1, 2))  # until it ends
        await periods.tick(2)
        assert not failed.done() and not gone.done()
        slurm.set(1, "FAILED")
        del slurm.jobs[2]  # MinJobAge passed, or scancel'd and purged: Slurm no longer knows it
        await periods.tick()
        assert failed.result() is not None and failed.result().state == "FAILED"  # type: ignore[union-attr]
        assert gone.result() is None
        await watcher.close()

    asyncio.run(main())


def test_a_failed_lookup_goes_to_that_rounds_waiters_and_the_watcher_goes_on() -> None:
    async def main() -> None:
        slurm, periods = Slurm(job(1)), Periods()
        watcher = JobWatcher(slurm.get_jobs, 0.5, sleep=periods.sleep)
        slurm.fail = True
        waiting = asyncio.ensure_future(watcher.wait(1, {"RUNNING"}))
        await settle()
        with pytest.raises(SlurmCommandError, match="timed out"):
            waiting.result()
        slurm.fail = False
        again = asyncio.ensure_future(watcher.wait(1, {"RUNNING"}))
        slurm.set(1, "RUNNING")
        await periods.tick()
        assert again.result().state == "RUNNING"  # type: ignore[union-attr]
        await watcher.close()

    asyncio.run(main())


def test_the_loop_runs_only_while_someone_waits() -> None:
    async def main() -> None:
        slurm, periods = Slurm(job(1), job(2)), Periods()
        watcher = JobWatcher(slurm.get_jobs, 0.5, sleep=periods.sleep)
        await periods.tick(2)
        assert slurm.lookups == []  # nobody waits: no call at all
        waiting = asyncio.ensure_future(watcher.wait(1, {"RUNNING"}))
        await settle()
        waiting.cancel()  # a start cancelled (festinad shutting down): its id is dropped
        await settle()
        assert watcher.watched == frozenset()
        await periods.tick(3)
        assert slurm.lookups == [(1,)]
        assert (await asyncio.wait_for(watcher.next_state(2), 1)) == slurm.jobs[2]  # a new waiter starts it again
        assert slurm.lookups == [(1,), (2,)]
        await watcher.close()

    asyncio.run(main())


def test_a_period_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="period_s must be > 0, got 0"):
        JobWatcher(Slurm().get_jobs, 0)
