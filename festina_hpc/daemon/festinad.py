"""festinad's core: the second driver of the policies, carrying their plans out through Slurm and the database.

``Festinad`` owns the ``LiveCluster`` (the policy's view) and the
``PolicyRouter`` the gateway asks, and keeps both in step with the two
sources of truth: the database (what festinad decided: instances, their jobs
and endpoints, every decision with its reason) and Slurm (what runs). One
model instance is one Slurm serving job running ``festina serve --engine
emulated|vllm`` on a port festinad picks; festinad polls the job's
``/health`` (readiness and its queue) rather than waiting for the job to
call in, so a restarted festinad needs nothing from the jobs but their
address, which the database and the job's comment both hold.

- ``setup()`` reads Slurm's nodes into the view, the database's live
  instances back into it (a restart), then reconciles.
- ``reconcile()`` (periodic): a job gone or finished stops its instance; a
  festina-tagged running job the database lacks is adopted (a user's own
  ``sbatch``, comment ``festina:model=M,instance=LABEL,port=P``); one of
  festinad's own (numeric instance label) that the database no longer holds
  is cancelled (no orphan); nodes that Slurm powered down or lost are off in
  the view; every ready instance's ``/health`` gives its queue to the view;
  an instance whose job Slurm ran on other GPUs than planned (Slurm picks the
  GPU of an MPS job) moves there in the view; then the catalogue's bounds are
  kept (``keep_bounds``: missing ``min_instances`` started, a model idle past
  its own ``keep_alive_s`` stopped).
- ``reconcile()`` also follows every job in the database without an end (festinad's serving jobs, and any
  job a node's epilog recorded) to its end: final state, end time and exit code from ``squeue --json``
  (which lists ended jobs for MinJobAge, 300 s by default), else one ``scontrol show job`` for all the
  rest (``get_jobs``); a job Slurm no
  longer knows at all gets the time festinad found it gone as its end, keeps the last state seen, and no
  exit code (``_record_job_ends``). sacct is not used: Debian's dev cluster has no slurmdbd.
- Whether a starting job ended is asked of Slurm by one ``JobWatcher`` for every job festinad waits on: one
  ``get_jobs`` call per ``job_poll_s``, not one ``scontrol show job`` per job (``daemon/job_watcher.py``).
- An instance the gateway could not reach (``PolicyRouter.failed``) is checked
  at once, not at the next reconcile (``_check_unreachable``): ready again if
  it answers, stopped if its job ended, so its requests wait for a replacement.
- ``scale_tick()`` and ``consolidate_tick()`` run the policy's ``scale()`` and
  ``consolidate()`` and carry the plan out: ``StartInstance`` submits a job,
  ``StopInstance`` drains then ``scancel``s, ``Migrate`` starts the target,
  waits for it to answer, shifts traffic (the source turns draining, so the
  policy routes to the target) and stops the source; ``PowerOff``/``PowerOn``
  need nothing (Slurm's power saving suspends idle nodes and resumes a node a
  job is sent to); ``MoveQueued`` has no live counterpart (queues live in the
  serving jobs); an action of any other type fails the plan (``TypeError``), never skipped.
  Every plan is recorded with its reason. Placements and plans
  pass the catalogue's per-model bounds first (``policy/limits.py``); what they
  refuse is recorded as ``refused: <why>``. A share (MPS) start is fitted to
  where Slurm will put it (``LiveCluster.slurm_fit``).

Per-GPU ``control()`` (clock, MPS share, batch cap) is not run here: it needs
the GPU's own counters and root, so it belongs to the node controller
(``festina-node``, issue 6), which calls the same policy method. What
festinad itself asks of a node (an admin's clock or share, draining an
instance) goes through ``control_node``: a signed request to the node's
control port (``daemon/node_control.py``), refused there unless genuine.

Each instance festinad starts gets its own secret (``serve/secret.py``): a file
``<secret_dir>/instance-<id>.secret`` (0600, festinad's user, who is also the
job's user) whose path, never the secret, is on the job's command line; the
server answers ``/v1/*`` and ``/admin/settings`` only with it. festinad keeps the
secret in memory, sends it on every request and ``/health`` poll (its
``Endpoint`` carries it), re-reads the file after a restart and deletes it when
the instance stops. festina-node reads the same file (root, by the job's
instance label) for ``/health`` and ``/admin/settings``.

Slurm calls run in a worker thread with the client's timeout and are retried
with exponential back-off (``SlurmRetry``); a Slurm that stays broken fails
that operation (a request gets 503, a tick logs and tries next period) while
the gateway keeps serving ready instances.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Never, NoReturn, TypeVar

import aiohttp

from festina_hpc.cluster.figures import USABLE_MEMORY_FRAC
from festina_hpc.daemon.job_watcher import JobWatcher
from festina_hpc.daemon.metrics import DecisionRate
from festina_hpc.daemon.node_control import NodeControlClient, NodeControlError
from festina_hpc.daemon.policy_router import InstanceLaunch, LiveCluster, LiveInstance, PolicyRouter, runs_as_mps
from festina_hpc.daemon.records import CompletionRecord, Outcome
from festina_hpc.daemon.routing import Endpoint, NoInstance
from festina_hpc.db.store import GpuRecord, JobRecord, NodeRecord, RequestOutcome, Store
from festina_hpc.errors import FestinaError
from festina_hpc.logs import RepeatedLines
from festina_hpc.policy.base import Policy
from festina_hpc.policy.limits import Refusal, limit_plan, upkeep
from festina_hpc.policy.types import (
    NO_LIMITS,
    Action,
    InstancePhase,
    Migrate,
    ModelLimits,
    MoveQueued,
    NodePower,
    Placement,
    Plan,
    PowerOff,
    PowerOn,
    Slo,
    StartInstance,
    StopInstance,
)
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.launch import serve_spec, simulated_argv, vllm_argv
from festina_hpc.serve.secret import read_secret_file, secret_path, write_secret
from festina_hpc.slurm.client import SlurmClient
from festina_hpc.slurm.errors import SlurmError, SlurmInputError
from festina_hpc.slurm.parse import gres_indices
from festina_hpc.slurm.types import FINISHED_JOB_STATES, PowerState, ServingJobSpec, SlurmJob, SlurmNode

log = logging.getLogger(__name__)

T = TypeVar("T")
_COMMENT = re.compile(r"festina:(?P<fields>[A-Za-z0-9_.=,/-]+)")
LIVE_JOB_STATES = frozenset({"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"})
# States in which a job holds its nodes and GRES: a user's serving job in one is adopted. CONFIGURING is a job
# whose node Slurm's power saving is still resuming: its MPS share is already taken there, so festinad must
# count it before it places anything (else it overcommits the node and its own job pends behind the user's).
ALLOCATED_JOB_STATES = frozenset({"RUNNING", "CONFIGURING"})


class StartFailed(FestinaError):
    """A serving job did not come up (refused, failed, or silent past the start timeout)."""


@dataclass(frozen=True)
class FestinadSettings:
    """How festinad runs serving jobs and how long it waits; from ``[daemon]`` (see festina.example.toml)."""

    engine: str = "emulated"  # what serving jobs run: "emulated" or "vllm"
    # The argv that runs festina inside a job: this interpreter, so no `festina` is needed on the nodes' PATH.
    festina_argv: tuple[str, ...] = (sys.executable, "-m", "festina_hpc.cli.main")
    serve_time_scale: float = 1.0
    job_output_dir: str = "/tmp"
    # The instances' secret files (0700, festinad's); the jobs read them on their nodes, so a shared
    # filesystem, and festina-node's [node] secret_dir. "" = <job_output_dir>/secrets.
    secret_dir: str = ""
    serve_port_base: int = 20000
    partition: str | None = None
    start_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    health_poll_s: float = 0.25  # while a job starts
    job_poll_s: float = 1.0  # Slurm's view of the starting jobs: one command a period for all (job_watcher.py)
    health_timeout_s: float = 2.0
    time_limit: str | None = None


@dataclass(frozen=True)
class ModelOptions:
    """An operator's settings of one model (its catalogue entry): bounds festinad enforces on every plan
    (``policy/limits.py``) and how its serving jobs are launched."""

    limits: ModelLimits = NO_LIMITS
    engine_args: str = ""  # extra engine arguments, shell words (serve/launch.py splits them; never a shell)
    account: str = ""  # Slurm account its jobs are charged to (#SBATCH --account); "" = the submitter's


# A bound refuses the same decision every tick while the load lasts: the same refusal is recorded at most once
# in this many seconds.
REFUSAL_RECORD_S = 60.0
# A line festinad would log unchanged every period is logged once, then again with its count this often.
REPEAT_SUMMARY_S = 600.0


def parse_comment(comment: str) -> dict[str, str] | None:
    """The fields of a festina job comment (``festina:model=M,instance=X,port=P``), or None for any other."""
    match = _COMMENT.fullmatch(comment.strip())
    if match is None:
        return None
    fields = dict(part.split("=", 1) for part in match["fields"].split(",") if "=" in part)
    return fields if "model" in fields else None


def job_comment(model: str, instance_id: int, port: int) -> str:
    return f"festina:model={model},instance={instance_id},port={port}"


class SlurmRetry:
    """Runs ``SlurmClient`` calls off the event loop, retrying failures with exponential back-off.

    Input refused by the client (``SlurmInputError``) is not retried: it would fail again.
    """

    def __init__(self, client: SlurmClient, attempts: int = 3, backoff_s: float = 0.5,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.client = client
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._sleep = sleep

    async def __call__(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return await asyncio.to_thread(fn, *args)
            except SlurmInputError:
                raise
            except SlurmError as exc:
                if attempt == self.attempts:
                    raise
                log.warning("slurm %s failed (attempt %d of %d, retrying in %.1f s): %s", what, attempt,
                            self.attempts, delay, exc)
                await self._sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")


class StoreRecorder:
    """The gateway's ``Recorder`` over the database: records queue in memory and ``flush()`` writes a batch,
    with checkpoints of the requests still in flight (``Gateway.in_flight``) so a crash loses at most a
    flush period of their tokens; ``recover()`` records what the last crash cut."""

    def __init__(self, store: Store):
        self.store = store
        self._pending: list[CompletionRecord] = []

    def record(self, record: CompletionRecord) -> None:
        self._pending.append(record)

    def flush(self, in_flight: Sequence[CompletionRecord] = ()) -> int:
        """Write the records queued so far; ``in_flight``, checkpoints taken before this call, go first, so a
        request that ended since its checkpoint has its final record written after it (and replacing it)."""
        batch, self._pending = self._pending, []
        try:
            if in_flight:
                self.store.checkpoint_requests([_outcome(r) for r in in_flight])
        except FestinaError as exc:
            log.error("could not checkpoint %d requests in flight: %s", len(in_flight), exc)
        if not batch:
            return 0
        outcomes = [_outcome(r) for r in batch]
        try:
            return self.store.record_requests(outcomes)
        except FestinaError as exc:
            log.error("could not record %d request outcomes: %s", len(batch), exc)
            return 0

    def recover(self) -> int:
        """Record the requests the previous festinad was answering when it died (their last checkpoint, outcome
        ``gateway_crashed``), so their tokens are charged; returns how many."""
        closed = self.store.close_requests_in_flight(Outcome.GATEWAY_CRASHED.value)
        if closed:
            log.warning("%d request(s) cut by festinad's last crash recorded as %s, with the tokens of their last "
                        "checkpoint", closed, Outcome.GATEWAY_CRASHED.value)
        return closed


def _utc(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


def _outcome(r: CompletionRecord) -> RequestOutcome:
    first = _utc(r.arrival_unix_s + r.ttft_s) if r.ttft_s is not None else None
    return RequestOutcome(model=r.model, arrival_at=_utc(r.arrival_unix_s), prompt_tokens=r.prompt_tokens,
                          output_tokens=r.output_tokens, slo_met=r.slo_met, instance_id=r.instance_id,
                          first_token_at=first, finish_at=_utc(r.arrival_unix_s + r.e2e_s), ttft_s=r.ttft_s,
                          mean_tbt_s=r.tbt_mean_s, max_tbt_s=r.tbt_max_s, user_name=r.user_name,
                          account=r.account, api_key_id=r.api_key_id, outcome=r.outcome.value,
                          external_id=r.request_id)


class Festinad:
    """See the module docstring. Build, ``await setup()``, hand ``router`` to the gateway, tick periodically."""

    def __init__(self, policy: Policy, profiles: ProfileStore, slurm: SlurmClient, store: Store,
                 slos: Mapping[str, Slo], settings: FestinadSettings = FestinadSettings(),
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 slurm_retry: SlurmRetry | None = None, node_control: NodeControlClient | None = None,
                 model_options: Mapping[str, ModelOptions] | None = None):
        self.policy = policy
        self.model_options = dict(model_options or {})  # canonical model name -> the catalogue's settings
        self.profiles = profiles
        self.slurm = slurm
        self.store = store
        self.slos = dict(slos)
        self.settings = settings
        self._clock = clock
        self._wall = wall_clock
        self._slurm = slurm_retry or SlurmRetry(slurm)
        # Every starting (or unreachable) instance's job, looked up together: one Slurm call a period, not one each.
        self.jobs = JobWatcher(lambda ids: self._slurm("get jobs", self.slurm.get_jobs, ids), settings.job_poll_s)
        self.cluster: LiveCluster | None = None
        self._router: PolicyRouter | None = None
        self.node_names: list[str] = []  # view node index -> Slurm node name
        self.node_address: dict[str, str] = {}
        self._node_db: dict[int, int] = {}  # view node index -> database node id
        self._gpu_db: dict[int, int] = {}  # view GPU id -> database GPU id
        self._gpu_view: dict[int, int] = {}  # database GPU id -> view GPU id
        self._busy: set[int] = set()
        self._unattached: set[int] = set()  # restored instances whose job festinad never recorded
        self._job_of: dict[int, int] = {}  # instance id -> its Slurm job  # instances a plan is moving or stopping
        self._secrets: dict[int, str] = {}  # instance id -> the secret its server answers only with
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.decision_rate = DecisionRate(clock=clock)  # what /metrics reports as decisions per second
        self.node_control = node_control  # signed requests to festina-node ([node_control]); None = off
        self._refusal_recorded: dict[str, float] = {}  # refusal reason -> when it was last recorded
        self._unmet: tuple[str, ...] = ()  # catalogue bounds that found no room, as last logged
        # A policy re-decides every period what it decided last time (power off the same empty nodes,
        # the same refusal): logged once, then counted, so the log shows each change of mind.
        self._repeated = RepeatedLines(log, summary_s=REPEAT_SUMMARY_S, clock=clock)

    # -- plumbing ------------------------------------------------------------------------------------

    @property
    def router(self) -> PolicyRouter:
        assert self._router is not None, "call setup() first"
        return self._router

    @property
    def view(self) -> LiveCluster:
        assert self.cluster is not None, "call setup() first"
        return self.cluster

    def _now(self) -> datetime:
        return _utc(self._wall())

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop festinad's own tasks (jobs keep running: a restarted festinad takes them back)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.close()
        if self._router is not None:
            await self._router.close()
        if self._session is not None:
            await self._session.close()

    # -- start-up --------------------------------------------------------------------------------------

    async def setup(self) -> None:
        """Build the view from Slurm's nodes and the database's live instances, then reconcile."""
        nodes = sorted(await self._slurm("list nodes", self.slurm.list_nodes), key=lambda n: _natural(n.name))
        nodes = [n for n in nodes if n.gpus_total > 0]
        if not nodes:
            raise FestinaError("Slurm reports no node with GPUs (gres gpu); festinad has nowhere to serve")
        gpus_per_node = max(n.gpus_total for n in nodes)
        self.node_names = [n.name for n in nodes]
        limits = {name: o.limits for name, o in self.model_options.items()}
        self.cluster = LiveCluster(self.profiles, self.policy.context.gpu_type, self.slos, nodes=len(nodes),
                                   gpus_per_node=gpus_per_node, clock=self._clock, limits=limits)
        self._router = PolicyRouter(self.policy, self.cluster, self._start_instance, self._stop_ready,
                                    new_instance_id=self._new_instance_id, on_refused=self._placement_refused,
                                    on_failed=self._instance_failed)
        node_ids = self.store.upsert_nodes([NodeRecord(n.name, _state(n), n.power_state is PowerState.ON,
                                                       gpus_per_node) for n in nodes])
        gpu_ids = self.store.upsert_gpus([GpuRecord(n.name, i, self.view.gpu_type)
                                          for n in nodes for i in range(gpus_per_node)])
        for index, n in enumerate(nodes):
            self._node_db[index] = node_ids[n.name]
            for i in range(gpus_per_node):
                view_gpu = index * gpus_per_node + i
                self._gpu_db[view_gpu] = gpu_ids[(n.name, i)]
                self._gpu_view[gpu_ids[(n.name, i)]] = view_gpu
        self._apply_nodes(nodes)
        self._restore()
        await self.reconcile()

    def _restore(self) -> None:
        """Put the database's live instances back into the view (a restart); reconcile checks them with Slurm."""
        state = self.store.load_live_state()
        jobs = {j.job_id: j for j in state.jobs}
        for row in state.instances:
            if row.model not in self.view.model_info or any(g not in self._gpu_view for g in row.gpus):
                log.warning("instance %d (%s) is not servable here any more: stopped", row.id, row.model)
                self.store.set_phase(row.id, InstancePhase.STOPPED, at=self._now())
                continue
            decision = StartInstance(row.model, tuple(self._gpu_view[g] for g in row.gpus), row.sm_pct,
                                     row.batch_cap, row.memory_fraction)
            try:
                inst = self.view.add(decision, row.id)
            except NoInstance as exc:
                log.warning("instance %d does not fit the view (%s): stopped", row.id, exc)
                self.store.set_phase(row.id, InstancePhase.STOPPED, at=self._now())
                continue
            inst.slurm_job_id = row.slurm_job_id
            if row.slurm_job_id is not None:
                self._job_of[row.id] = row.slurm_job_id
            if row.slurm_job_id is None:
                self._unattached.add(inst.id)  # crashed between sbatch and recording it: reconcile decides
            self._load_secret(row.id)
            if row.endpoint_url:
                inst.endpoint = self._endpoint(row.endpoint_url, inst.id)
            job = jobs.get(row.slurm_job_id) if row.slurm_job_id else None
            log.info("restored instance %d (%s, %s, job %s %s)", inst.id, inst.model, row.phase.name.lower(),
                     row.slurm_job_id, job.state if job else "?")
            # Ready again once its endpoint answers; a job that is gone is found by reconcile.
            if inst.endpoint is not None:
                self._spawn(self._await_ready(inst, inst.endpoint.url, self.settings.start_timeout_s,
                                              ask_node=inst.id not in self._secrets))

    # -- starting and stopping instances ------------------------------------------------------------------

    def _new_instance_id(self, decision: StartInstance) -> int:
        gpus = [self._gpu_db[g] for g in decision.gpus]
        return self.store.create_instance(decision.model, gpus, at=self._now(), sm_pct=decision.sm_pct,
                                          batch_cap=decision.batch_cap, memory_fraction=decision.memory_fraction)

    @property
    def secret_dir(self) -> Path:
        return Path(self.settings.secret_dir or Path(self.settings.job_output_dir) / "secrets")

    def _endpoint(self, url: str, instance_id: int) -> Endpoint:
        return Endpoint(url, instance_id, self._secrets.get(instance_id))

    def _load_secret(self, instance_id: int) -> None:
        """A restored instance's secret, from its file (none: an adopted job, or one started before secrets)."""
        path = secret_path(self.secret_dir, instance_id)
        if not path.exists():
            return
        try:
            self._secrets[instance_id] = read_secret_file(path)
        except FestinaError as exc:
            log.warning("instance %d: %s; festinad talks to it without a secret", instance_id, exc)

    def _drop_secret(self, instance_id: int) -> None:
        if self._secrets.pop(instance_id, None) is not None:
            secret_path(self.secret_dir, instance_id).unlink(missing_ok=True)

    def port_of(self, instance_id: int) -> int:
        """The port of an instance's server: unique per instance id (instances on one node never collide)."""
        return self.settings.serve_port_base + instance_id % 20000

    def job_spec(self, launch: InstanceLaunch, secret_file: str = "") -> tuple[ServingJobSpec, str]:
        """The serving job of ``launch`` and the URL its server will answer on; its server reads its secret from
        ``secret_file`` ("" = an open server)."""
        node = self.node_names[launch.node]
        port = self.port_of(launch.instance_id)
        s = self.settings
        options = self.model_options.get(launch.model, ModelOptions())
        serve = serve_spec(self.profiles, launch.model, launch.gpu_type, port, host="0.0.0.0", sm_pct=launch.sm_pct,
                           batch_cap=launch.batch_cap, memory_fraction=launch.memory_fraction,
                           engine_args=options.engine_args, secret_file=secret_file)
        argv = simulated_argv(serve, list(s.festina_argv), s.serve_time_scale) if s.engine == "emulated" \
            else vllm_argv(serve, python=s.festina_argv[0])
        tp = len(launch.gpus)
        # A share of one GPU: MPS (Slurm sets CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). A whole GPU, or several:
        # gpu gres (measured here: a second mps:100 job on a node with two free GPUs stays pending).
        pct = round(launch.sm_pct)
        share = {"mps_pct": max(1, pct)} if runs_as_mps(tp, launch.sm_pct) else {"gpus": tp}
        spec = ServingJobSpec(model=launch.model, instance_id=str(launch.instance_id), command=tuple(argv),
                              output_path=str(Path(s.job_output_dir) / f"festina-serve-{launch.instance_id}-%j.out"),
                              nodelist=(node,), comment=job_comment(launch.model, launch.instance_id, port),
                              partition=s.partition, account=options.account or None, time_limit=s.time_limit,
                              **share)  # type: ignore[arg-type]
        host = self.node_address.get(node) or node
        return spec, f"http://{host}:{port}"

    async def _start_instance(self, launch: InstanceLaunch) -> Endpoint:
        """``PolicyRouter``'s start: submit the serving job, wait until its server answers."""
        try:
            path, self._secrets[launch.instance_id] = write_secret(self.secret_dir, launch.instance_id)
        except FestinaError as exc:
            self.store.set_phase(launch.instance_id, InstancePhase.STOPPED, at=self._now())
            raise StartFailed(str(exc)) from None
        spec, url = self.job_spec(launch, str(path))
        try:
            job_id = await self._slurm("submit", self.slurm.submit, spec)
        except SlurmError as exc:
            self.store.set_phase(launch.instance_id, InstancePhase.STOPPED, at=self._now())
            self._drop_secret(launch.instance_id)
            raise StartFailed(f"sbatch failed: {exc}") from None
        self._job_of[launch.instance_id] = job_id
        inst = self.view.live.get(launch.instance_id)
        if inst is not None:
            inst.slurm_job_id = job_id
        self.store.update_instance(launch.instance_id, slurm_job_id=job_id, endpoint_url=url)
        log.info("instance %d of %s: job %d on %s, %s", launch.instance_id, launch.model, job_id,
                 self.node_names[launch.node], url)
        try:
            await self._wait_job_ready(job_id, url, self.settings.start_timeout_s, self._secrets[launch.instance_id])
        except Exception as exc:
            # Never leave a job that nobody will route to. (Cancelled waits, festinad shutting down, keep
            # their job: the database holds it and a restarted festinad waits for it again.)
            await self._cancel(job_id)
            self.store.set_phase(launch.instance_id, InstancePhase.STOPPED, at=self._now())
            self._drop_secret(launch.instance_id)
            if isinstance(exc, StartFailed):
                raise
            raise StartFailed(f"job {job_id}: {exc}") from None
        self.store.set_phase(launch.instance_id, InstancePhase.READY, at=self._now())
        return self._endpoint(url, launch.instance_id)

    async def _wait_job_ready(self, job_id: int, url: str, timeout_s: float, secret: str | None) -> None:
        """Until the server answers; ``StartFailed`` when its job ends first (the job watcher says) or past
        ``timeout_s``; the watcher's Slurm errors raise as they are."""
        deadline = self._clock() + timeout_s
        ended = asyncio.ensure_future(self.jobs.wait(job_id))
        try:
            while True:
                if ended.done():
                    job = ended.result()
                    raise StartFailed(f"job {job_id} ended ({job.state if job else 'gone'}) before it served")
                if self._clock() >= deadline:
                    raise StartFailed(f"job {job_id} did not answer on {url} within {timeout_s:g} s")
                if await self._health(url, secret) is not None:
                    return
                await asyncio.sleep(self.settings.health_poll_s)
        finally:
            _let_go(ended)

    async def _health(self, url: str, secret: str | None) -> dict[str, Any] | None:
        """The server's /health body when it answers 200, else None (with ``secret``: the full body)."""
        try:
            async with self._http().get(f"{url}/health", headers=Endpoint(url, secret=secret).auth_headers()) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json()
                return body if isinstance(body, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def _secret_from_node(self, inst: LiveInstance) -> None:
        """The secret of a user's job (or one whose file festinad lost), from its node: festina-node (root) reads
        the job user's own file there (``serve/secret.py``). Nothing when festinad has no channel to the nodes or
        the node knows none: the instance is then called without one."""
        if self.node_control is None or inst.slurm_job_id is None:
            return
        node = self.node_names[inst.node]
        try:
            secret = await self.control_node(node, "instance_secret", {"job_id": inst.slurm_job_id})
        except NodeControlError as exc:
            log.warning("instance %d (job %d): no secret from node %s (%s): called without one", inst.id,
                        inst.slurm_job_id, node, exc)
            return
        if isinstance(secret, str) and secret:
            self._secrets[inst.id] = secret

    async def _await_ready(self, inst: LiveInstance, url: str, timeout_s: float, ask_node: bool = False) -> None:
        """A restored or adopted instance turns ready when its server answers (reconcile drops it if its job ends);
        ``ask_node``: first learn its secret from its node (``_secret_from_node``)."""
        deadline = self._clock() + timeout_s
        if ask_node:
            await self._secret_from_node(inst)
        while inst.id in self.view.live and self._clock() < deadline:
            body = await self._health(url, self._secrets.get(inst.id))
            if body is not None:
                if body.get("model") and "running" not in body:
                    # festina's server keeps its queue from a caller without its secret: the requests routed
                    # there will be refused (502). Said once here, where an operator looks for why.
                    log.warning("instance %d (job %s) at %s answers only with a secret festinad does not hold "
                                "(no file, or no answer from its node): its requests will fail", inst.id,
                                inst.slurm_job_id, url)
                self._mark_ready(inst, url)
                return
            await asyncio.sleep(self.settings.health_poll_s)

    def _instance_failed(self, inst: LiveInstance) -> None:
        """``PolicyRouter``'s report of an instance the gateway could not reach (it is loading again)."""
        log.warning("instance %d of %s (job %s) could not be reached: checked now", inst.id, inst.model,
                    inst.slurm_job_id)
        self._spawn(self._check_unreachable(inst))

    async def _check_unreachable(self, inst: LiveInstance) -> None:
        """What reconcile would find, without waiting for it: the instance's job ended (killed, cancelled) stops
        it, freeing its place, so the requests waiting on it are placed again and a replacement starts as a cold
        start would; a server that answers again is ready (a connection lost, not the instance); a job that runs
        but does not answer within ``start_timeout_s`` is cancelled, as a start that never answers is."""
        assert inst.endpoint is not None
        url = inst.endpoint.url
        deadline = self._clock() + self.settings.start_timeout_s
        ended: asyncio.Future[SlurmJob | None] | None = None  # the job watcher's word that the job ended
        try:
            while inst.id in self.view.live and inst.phase is InstancePhase.LOADING and inst.id not in self._busy:
                if await self._health(url, self._secrets.get(inst.id)) is not None:
                    log.info("instance %d of %s answers again", inst.id, inst.model)
                    self._mark_ready(inst, url)
                    return
                if ended is not None and ended.done():
                    try:
                        job = ended.result()
                    except SlurmError as exc:
                        log.warning("instance %d: Slurm does not say whether job %d runs: %s", inst.id,
                                    inst.slurm_job_id, exc)
                    else:
                        self._forget(inst, f"unreachable, job {inst.slurm_job_id} {job.state if job else 'gone'}")
                        return
                    ended = None
                if ended is None and inst.slurm_job_id is not None:
                    ended = asyncio.ensure_future(self.jobs.wait(inst.slurm_job_id))
                if self._clock() >= deadline:
                    await self.stop_instance(inst, f"unreachable for {self.settings.start_timeout_s:g} s")
                    return
                await asyncio.sleep(self.settings.job_poll_s)
        finally:
            if ended is not None:
                _let_go(ended)

    def _mark_ready(self, inst: LiveInstance, url: str) -> None:
        if inst.phase is not InstancePhase.LOADING:
            return
        inst.lost = False
        inst.endpoint = self._endpoint(url, inst.id)
        inst.phase = InstancePhase.READY
        inst.ready_at_s = self.view.now_s
        if not inst.ready.done():
            inst.ready.set_result(inst.endpoint)
        self.store.set_phase(inst.id, InstancePhase.READY, at=self._now())

    async def _stop_ready(self, instance_id: int, endpoint: Endpoint) -> None:
        """``PolicyRouter``'s stop for an evicted idle instance (already out of the view)."""
        job = self._job_of.get(instance_id)
        if job is not None:
            await self._cancel(job)
        self._drop_secret(instance_id)
        self.store.set_phase(instance_id, InstancePhase.STOPPED, at=self._now())

    async def _cancel(self, job_id: int) -> None:
        try:
            await self._slurm("cancel", self.slurm.cancel, job_id)
        except SlurmError as exc:
            # The reconcile loop finds the job again and cancels it then.
            log.error("could not cancel job %d: %s", job_id, exc)

    async def stop_instance(self, inst: LiveInstance, reason: str) -> None:
        """Drain (no new requests; those it holds get ``drain_timeout_s``), then cancel its job."""
        if inst.phase is InstancePhase.READY:
            inst.phase = InstancePhase.DRAINING
            self.store.set_phase(inst.id, InstancePhase.DRAINING, at=self._now())
            deadline = self._clock() + self.settings.drain_timeout_s
            while inst.in_flight and self._clock() < deadline:
                await asyncio.sleep(0.05)
        # scancel sends SIGTERM: the server drains what is left (its own drain) before it exits.
        if inst.slurm_job_id is not None:
            await self._cancel(inst.slurm_job_id)
        self._forget(inst, reason)

    def _forget(self, inst: LiveInstance, reason: str) -> None:
        self.view.remove(inst)
        self._drop_secret(inst.id)
        if not inst.ready.done():
            inst.ready.set_exception(NoInstance(f"instance {inst.id} of {inst.model} stopped: {reason}"))
            inst.ready.exception()
        self.store.set_phase(inst.id, InstancePhase.STOPPED, at=self._now())
        log.info("instance %d of %s stopped: %s", inst.id, inst.model, reason)

    async def control_node(self, node: str, op: str, args: Mapping[str, Any]) -> Any:
        """One signed request to ``node``'s festina-node (clock, shares, drain an instance); its result.

        ``NodeControlError`` when [node_control] is off, the node refuses, or it does not answer.
        """
        if self.node_control is None:
            raise NodeControlError("festinad has no channel to the nodes: set [node_control] port")
        result = await asyncio.to_thread(self.node_control.call, node, op, args)
        log.info("node %s: %s %s done", node, op, dict(args))
        return result

    # -- reconcile ---------------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Bring the view and the database in line with Slurm (see the module docstring)."""
        try:
            nodes = await self._slurm("list nodes", self.slurm.list_nodes)
            jobs = await self._slurm("list jobs", self.slurm.list_jobs)
        except SlurmError as exc:
            log.error("reconcile skipped, Slurm does not answer: %s", exc)
            return
        self._apply_nodes(nodes)
        by_id = {j.job_id: j for j in jobs}
        known_nodes = {n.name for n in nodes if n.state not in ("down",) and "NOT_RESPONDING" not in n.flags}
        self.store.upsert_jobs([_job_record(j) for j in jobs if parse_comment(j.comment) is not None])
        await self._record_job_ends(by_id)
        tracked: set[int] = set()
        for inst in list(self.view.live.values()):
            if inst.slurm_job_id is None:
                continue  # its sbatch is in flight
            tracked.add(inst.slurm_job_id)
            job = by_id.get(inst.slurm_job_id)
            if job is None or job.state in FINISHED_JOB_STATES:
                if inst.id not in self._busy:
                    self._forget(inst, f"job {inst.slurm_job_id} {'gone' if job is None else job.state}")
                continue
            if job.state == "RUNNING" and job.nodes and job.nodes[0] not in known_nodes:
                # The node is gone: the job cannot serve; free its place so requests start one elsewhere.
                await self._cancel(job.job_id)
                self._forget(inst, f"node {job.nodes[0]} disappeared")
                continue
            if job.gres:
                # What the job holds, not what the view assumed (a restored adopted mps:100 job is a share).
                inst.shared = any(g.name == "mps" for g in job.gres)
            if job.state in ALLOCATED_JOB_STATES:
                self._follow_slurm_gpus(inst, job)
            if job.state == "PENDING" and inst.phase is InstancePhase.READY and inst.id not in self._busy:
                # Requeued behind festinad's back (a node failure, an admin): loading again until it answers.
                inst.phase = InstancePhase.LOADING
                inst.ready = asyncio.get_running_loop().create_future()
                if inst.endpoint is not None:
                    self._spawn(self._await_ready(inst, inst.endpoint.url, self.settings.start_timeout_s))
        live_ids = set(self.view.live)
        for job in jobs:
            fields = parse_comment(job.comment)
            if fields is None or job.job_id in tracked or job.state not in LIVE_JOB_STATES:
                continue
            label = fields.get("instance", "")
            if label.isdigit():
                owner = self.view.live.get(int(label))
                if int(label) in self._unattached and owner is not None:
                    self._attach(owner, job, fields)
                    continue
                if int(label) in live_ids and owner is not None and owner.slurm_job_id is None:
                    continue  # festinad's own submit, answered after this listing began
                # festinad's own job for an instance it no longer holds (a crash between decide and scancel).
                log.warning("job %d of instance %s is not festinad's any more: cancelled (orphan)", job.job_id, label)
                await self._cancel(job.job_id)
                continue
            if job.state in ALLOCATED_JOB_STATES:
                self._adopt(job, fields)
        for instance_id in list(self._unattached):
            self._unattached.discard(instance_id)
            lost = self.view.live.get(instance_id)
            if lost is not None and lost.slurm_job_id is None:
                self._forget(lost, "its job was never submitted")
        await self._poll_load()
        self.store.upsert_nodes([NodeRecord(n.name, _state(n), n.power_state is PowerState.ON, n.gpus_total)
                                 for n in nodes if n.name in self.node_names])
        await self.keep_bounds()

    async def _record_job_ends(self, listed: Mapping[int, SlurmJob]) -> None:
        """Bring every job the database holds without an end up to date with Slurm (see the module docstring)."""
        open_jobs = self.store.open_jobs()
        # Not listed: squeue may hide another user's jobs (PrivateData); scontrol answers for them, all in one call.
        unlisted = [known.job_id for known in open_jobs if known.job_id not in listed]
        found: Mapping[int, SlurmJob] = {}
        if unlisted:
            try:
                found = await self._slurm("get jobs", self.slurm.get_jobs, unlisted)
            except SlurmError as exc:
                log.warning("%d job(s): ends not recorded this time, Slurm does not answer: %s", len(unlisted), exc)
                open_jobs = [known for known in open_jobs if known.job_id in listed]
        updates: list[JobRecord] = []
        for known in open_jobs:
            job = listed.get(known.job_id) or found.get(known.job_id)
            if job is None:
                # Forgotten (MinJobAge passed while festinad was away): its end is when we found it gone.
                log.info("job %d: Slurm no longer knows it; recorded as ended now (last seen %s)",
                         known.job_id, known.state)
                now = self._now()
                updates.append(JobRecord(known.job_id, known.state, end_at=max(now, known.start_at or now)))
            elif job.state != known.state or job.end_time_s is not None:
                updates.append(_job_record(job))
        if updates:
            self.store.upsert_jobs(updates)

    async def keep_bounds(self) -> None:
        """What the catalogue's bounds call for: start a model's missing ``min_instances``, stop a model idle
        past its own ``keep_alive_s`` (run at start-up and every reconcile)."""
        kept = upkeep(self.view)
        if kept.unmet != self._unmet:
            for problem in kept.unmet:
                log.warning("catalogue bound not met: %s", problem)
            self._unmet = kept.unmet
        await self.execute(kept.plan)

    def _apply_nodes(self, nodes: Sequence[SlurmNode]) -> None:
        listed = {n.name: n for n in nodes}
        for index, name in enumerate(self.node_names):
            n = listed.get(name)
            view_node = self.view.node(index)
            if n is not None and n.address:
                self.node_address[name] = n.address
            # A node Slurm's power saving suspended is on for the policy: Slurm resumes it when a job is
            # sent there, and it is headroom that consolidation may count on. Only a node that is down,
            # drained, not responding or no longer listed is off (unusable).
            # A node in the power-saving cycle may show NOT_RESPONDING while its slurmd is stopped or booting.
            silent = n is not None and "NOT_RESPONDING" in n.flags and n.power_state is PowerState.ON
            up = n is not None and n.state != "down" and not silent and not n.drained
            view_node.power = NodePower.ON if up else NodePower.OFF

    def slurm_gpus(self, job: SlurmJob) -> tuple[int, ...] | None:
        """The view GPUs Slurm gave ``job`` (its allocated GRES index on its first node), or None when
        Slurm does not say (pending, no ``gres_detail``, a node festinad does not serve)."""
        if not job.nodes or not job.gres_detail or job.nodes[0] not in self.node_names:
            return None
        node = self.view.node(self.node_names.index(job.nodes[0]))
        given = gres_indices(job.gres_detail[0])
        indices = given.get("gpu") or given.get("mps") or ()
        if not indices or any(i >= len(node.gpus) for i in indices):
            return None
        return tuple(node.gpus[i] for i in indices)

    def _follow_slurm_gpus(self, inst: LiveInstance, job: SlurmJob) -> None:
        """Put the instance where Slurm runs it: Slurm, not festina, picks the GPU of an MPS job (22.05 puts a
        node's MPS jobs on one GPU), so the room the policy sees per GPU is the room Slurm will grant."""
        gpus = self.slurm_gpus(job)
        if gpus is None or gpus == inst.gpus or len(gpus) != len(inst.gpus):
            return
        log.info("instance %d: Slurm runs job %d on GPU(s) %s, not %s as planned: the view follows", inst.id,
                 job.job_id, gpus, inst.gpus)
        self.view.move(inst, gpus)
        self.store.update_instance(inst.id, gpu_ids=[self._gpu_db[g] for g in gpus])

    def _attach(self, inst: LiveInstance, job: SlurmJob, fields: Mapping[str, str]) -> None:
        self._unattached.discard(inst.id)
        inst.slurm_job_id = self._job_of[inst.id] = job.job_id
        node = self.node_names[inst.node]
        url = f"http://{self.node_address.get(node) or node}:{fields.get('port') or self.port_of(inst.id)}"
        self.store.update_instance(inst.id, slurm_job_id=job.job_id, endpoint_url=url)
        self._spawn(self._await_ready(inst, url, self.settings.start_timeout_s))

    def _adopt(self, job: SlurmJob, fields: Mapping[str, str]) -> None:
        """Take a user's running (or starting) serving job into the view: the policy routes to it like any other."""
        model = fields["model"]
        port = fields.get("port", "")
        try:
            canonical = self.profiles.model(model).name
        except FestinaError:
            canonical = model
        if canonical not in self.view.model_info or not port.isdigit() or not job.nodes \
                or job.nodes[0] not in self.node_names:
            log.warning("job %d is tagged festina but cannot be adopted (model %s, port %r, nodes %s)",
                        job.job_id, model, port, job.nodes)
            return
        node = self.node_names.index(job.nodes[0])
        mps = sum(g.count for g in job.gres if g.name == "mps")
        sm_pct = float(min(100, mps)) if mps else 100.0
        info = self.view.model(canonical)
        # Where Slurm says it runs; while it does not say (a job still configuring), where Slurm puts MPS jobs.
        chosen = self.slurm_gpus(job)
        if chosen is None and mps and info.tp == 1:
            mps_gpu = self.view.mps_gpu(node)
            chosen = (mps_gpu,) if mps_gpu is not None else None
        if chosen is None:
            gpus = [g for g in self.view.node(node).gpus
                    if self.view.gpu(g).sm_pct_allocated + sm_pct <= 100 + 1e-6]
            if len(gpus) < info.tp:
                log.warning("job %d (%s) does not fit festinad's view of %s: not adopted", job.job_id, canonical,
                            job.nodes[0])
                return
            chosen = tuple(sorted(gpus, key=lambda g: -self.view.gpu(g).sm_pct_allocated)[:info.tp])
        free = min(1.0 - self.view.gpu(g).memory_fraction_allocated for g in chosen)
        usable = self.view.spec.memory_bytes * USABLE_MEMORY_FRAC
        fraction = min(free, max(0.05, 1.5 * info.weights_bytes_per_gpu / usable))
        decision = StartInstance(canonical, chosen, sm_pct, 256, round(fraction, 4))
        try:
            self.view.check(decision)
        except NoInstance as exc:
            log.warning("job %d (%s) not adopted: %s", job.job_id, canonical, exc)
            return
        host = self.node_address.get(job.nodes[0]) or job.nodes[0]
        url = f"http://{host}:{port}"
        instance_id = self.store.create_instance(canonical, [self._gpu_db[g] for g in chosen], at=self._now(),
                                                 sm_pct=sm_pct, batch_cap=256, memory_fraction=decision.memory_fraction,
                                                 slurm_job_id=job.job_id, endpoint_url=url)
        inst = self.view.add(decision, instance_id, shared=bool(mps))
        inst.slurm_job_id = self._job_of[instance_id] = job.job_id
        self._record_plan(Plan((self._to_db(decision),), f"adopt job {job.job_id} of {job.user or '?'}"))
        log.info("adopted job %d (%s on %s, %s) as instance %d", job.job_id, canonical, job.nodes[0], url,
                 instance_id)
        self._spawn(self._await_ready(inst, url, self.settings.start_timeout_s, ask_node=True))

    async def _poll_load(self) -> None:
        """Each ready instance's own count of what it holds (a restarted festinad learns its queues here)."""
        ready = [i for i in self.view.live.values() if i.phase is InstancePhase.READY and i.endpoint is not None]
        bodies = await asyncio.gather(*(self._health(i.endpoint.url, i.endpoint.secret) for i in ready
                                        if i.endpoint is not None))
        for inst, body in zip(ready, bodies):
            if body is None:
                continue
            inst.reported_in_flight = int(body.get("running", 0)) + int(body.get("waiting", 0))
            inst.reported_pending_prompt_tokens = int(body.get("pending_prompt_tokens", 0))
            if inst.reported_in_flight:
                inst.last_busy_s = self.view.now_s

    # -- periodic policy steps -----------------------------------------------------------------------------

    async def scale_tick(self) -> None:
        self.router.learn()  # the policy plans with what the requests that ended since told it
        await self.execute(self.policy.scale(self.view))

    async def consolidate_tick(self) -> None:
        self.router.learn()
        await self.execute(self.policy.consolidate(self.view))

    async def execute(self, plan: Plan) -> None:
        """Record ``plan`` with its reason, then carry out each action (one failing does not stop the rest).

        The catalogue's bounds apply first: an action they refuse is recorded with ``refused: <why>`` as its
        reason and not carried out. An action of a type festinad does not know fails the whole plan (``TypeError``)
        before anything of it is recorded or done."""
        for action in plan.actions:
            if not isinstance(action, Action):
                _unhandled(action)
        limited = limit_plan(plan, self.view)
        for refusal in limited.refused:
            self._record_refusal(refusal, plan.reason)
        plan = limited.plan
        if not plan:
            return
        self._record_plan(Plan(tuple(self._to_db(a) for a in plan.actions), plan.reason))
        for action in plan.actions:
            try:
                await self._do(action, plan.reason)
            except FestinaError as exc:
                log.error("%s (%s) failed: %s", type(action).__name__, plan.reason, exc)

    async def _do(self, action: Action, reason: str) -> None:
        if isinstance(action, StartInstance):
            self.router.start(action)
        elif isinstance(action, StopInstance):
            inst = self.view.live.get(action.instance_id)
            if inst is None or inst.id in self._busy:
                return
            self._busy.add(inst.id)
            try:
                await self.stop_instance(inst, reason)
            finally:
                self._busy.discard(inst.id)
        elif isinstance(action, Migrate):
            await self._migrate(action, reason)
        elif isinstance(action, PowerOff | PowerOn):
            # Slurm's power saving suspends a node idle for SuspendTime and resumes one a job is sent to.
            node = self.node_names[action.node] if 0 <= action.node < len(self.node_names) else action.node
            self._repeated.log(("power", node), logging.INFO, "%s node %s (%s): left to Slurm's power saving",
                               type(action).__name__, node, reason)
        elif isinstance(action, MoveQueued):
            log.info("%s has no live counterpart (queues live in the serving jobs): skipped", type(action).__name__)
        else:
            _unhandled(action)

    async def _migrate(self, action: Migrate, reason: str) -> None:
        """Start on the target, wait until it answers, shift traffic (the source drains), stop the source."""
        source = self.view.live.get(action.instance_id)
        if source is None or source.phase is not InstancePhase.READY or source.id in self._busy:
            return
        self._busy.add(source.id)
        try:
            target = self.router.start(StartInstance(source.model, action.gpus, action.sm_pct, source.batch_cap,
                                                     action.memory_fraction))
            try:
                await asyncio.wait_for(asyncio.shield(target.ready), self.settings.start_timeout_s + 5)
            except (NoInstance, TimeoutError) as exc:
                log.error("migration of instance %d to GPUs %s failed, it stays: %s", source.id, action.gpus, exc)
                return
            log.info("instance %d of %s migrated to instance %d (%s)", source.id, source.model, target.id, reason)
            await self.stop_instance(source, f"migrated to instance {target.id}: {reason}")
        finally:
            self._busy.discard(source.id)

    def _first_in_a_while(self, why: str) -> bool:
        """Whether a refusal for ``why`` is to be recorded (not recorded in the last ``REFUSAL_RECORD_S``)."""
        now = self._clock()
        if now - self._refusal_recorded.get(why, -REFUSAL_RECORD_S) < REFUSAL_RECORD_S:
            return False
        self._refusal_recorded[why] = now
        return True

    def _record_refusal(self, refusal: Refusal, reason: str) -> None:
        self._repeated.log(("refused", refusal.reason), logging.INFO, "%s (%s) refused: %s",
                           type(refusal.decision).__name__, reason, refusal.reason)
        decision = refusal.decision
        if isinstance(decision, StartInstance | StopInstance | Migrate | PowerOff | PowerOn) \
                and self._first_in_a_while(refusal.reason):
            self.store.record_plan(Plan((self._to_db(decision),), f"refused: {refusal.reason} ({reason})"),
                                   at=self._now())

    def _placement_refused(self, model: str, refusal: Refusal, instead: Placement) -> None:
        """A request's start refused by the bounds: recorded as the placement carried out instead, with why."""
        self._repeated.log(("start refused", model), logging.INFO, "start of %s refused: %s", model, refusal.reason)
        if self._first_in_a_while(refusal.reason):
            self.store.record_placement(model, instead, at=self._now(), reason=f"start refused: {refusal.reason}")

    def _record_plan(self, plan: Plan) -> None:
        self.store.record_plan(plan, at=self._now())
        self.decision_rate.add(len(plan.actions))

    def _to_db(self, action: Action) -> Action:
        """The action with database ids (the view numbers GPUs and nodes from 0)."""
        if isinstance(action, StartInstance | Migrate):
            return replace(action, gpus=tuple(self._gpu_db.get(g, g) for g in action.gpus))
        if isinstance(action, PowerOff | PowerOn):
            return replace(action, node=self._node_db.get(action.node, action.node))
        return action


def _let_go(watch: asyncio.Future[Any]) -> None:
    """Stop waiting on the job watcher; an error it already answered with is taken (not logged as lost)."""
    if watch.done():
        if not watch.cancelled():
            watch.exception()
    else:
        watch.cancel()


def _unhandled(action: Never) -> NoReturn:
    """A plan's action festinad has no branch for: a new ``Action`` type fails here, loudly, never skipped."""
    raise TypeError(f"festinad cannot carry out a {type(action).__name__}: not an action it knows "
                    "(policy/types.py Action, Festinad._do)")


def _natural(name: str) -> tuple[Any, ...]:
    """n2 before n10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _state(node: SlurmNode) -> str:
    return "+".join([node.state, *(f.lower() for f in node.flags)])


def _job_record(job: SlurmJob) -> JobRecord:
    return JobRecord(job_id=job.job_id, state=job.state, name=job.name[:255], user_name=job.user,
                     account=job.account, partition=job.partition, node_list=",".join(job.nodes),
                     gres=",".join(g.spec() for g in job.gres)[:255],
                     submit_at=_utc(job.submit_time_s) if job.submit_time_s else None,
                     start_at=_utc(job.start_time_s) if job.start_time_s else None,
                     end_at=_utc(job.end_time_s) if job.end_time_s else None,
                     exit_code=job.exit_code, exit_signal=job.exit_signal)
