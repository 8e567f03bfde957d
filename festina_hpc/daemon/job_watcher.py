"""One Slurm call per period for every job festinad waits on, however many start at once.

A starting instance (and one festinad checks after the gateway could not reach
it) waits for its job to run or end. Asking Slurm job by job is one
``scontrol show job`` per job per period against slurmctld: with N instances
starting, N calls a period. ``JobWatcher`` instead collects the ids waited on,
looks them all up in one call each period (``SlurmClient.get_jobs``) and wakes
every waiter with its job as that listing found it, or None when Slurm no
longer knows the job. The loop runs only while someone waits; a failed lookup
is handed to that round's waiters (each decides what it means to it) and the
loop goes on. Sleep is injected so tests run without real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

from festina_hpc.slurm.types import FINISHED_JOB_STATES, SlurmJob

# Looks up many job ids in one Slurm call: those Slurm knows, by id.
JobLookup = Callable[[Sequence[int]], Awaitable[Mapping[int, SlurmJob]]]


class JobWatcher:
    """Batches the job lookups of every waiter into one ``lookup`` call per ``period_s``."""

    def __init__(self, lookup: JobLookup, period_s: float,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not period_s > 0:
            raise ValueError(f"job watcher period_s must be > 0, got {period_s!r}")
        self._lookup = lookup
        self._period_s = period_s
        self._sleep = sleep
        self._waiters: dict[int, list[asyncio.Future[SlurmJob | None]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self.rounds = 0  # lookups made, for metrics and tests

    @property
    def watched(self) -> frozenset[int]:
        """The job ids someone waits on now."""
        return frozenset(self._waiters)

    async def next_state(self, job_id: int) -> SlurmJob | None:
        """The job as the next listing finds it; None when Slurm no longer knows it (the lookup's errors raise)."""
        future: asyncio.Future[SlurmJob | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._run())
        try:
            return await future
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None and future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._waiters[job_id]

    async def wait(self, job_id: int, states: Collection[str] = ()) -> SlurmJob | None:
        """The job once a listing finds it in one of ``states`` or ended (``FINISHED_JOB_STATES``); None once
        Slurm no longer knows it. With no ``states``: until it ends."""
        while True:
            job = await self.next_state(job_id)
            if job is None or job.state in states or job.state in FINISHED_JOB_STATES:
                return job

    async def close(self) -> None:
        """Stop the loop; waiters still waiting are cancelled."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for futures in self._waiters.values():
            for future in futures:
                future.cancel()

    async def _run(self) -> None:
        # The first round at once: a job refused at submit (or ended before anyone looked) is found without
        # waiting a period; afterwards one round per period while anyone waits.
        while self._waiters:
            round_ = {job_id: list(futures) for job_id, futures in self._waiters.items()}
            self.rounds += 1
            try:
                jobs = await self._lookup(sorted(round_))
            except Exception as exc:  # noqa: BLE001 - handed to this round's waiters, who decide; the loop goes on
                for futures in round_.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
            else:
                for job_id, futures in round_.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(jobs.get(job_id))
            await self._sleep(self._period_s)
