"""festina-node's local controller: every tick, per GPU, the policy's ``control()`` over what its model servers report.

The simulator runs ``policy.control(gpu, view)`` on its own state; on a live
node this module does: it asks each festina serving job's model server
(``GET /health`` on this node's loopback, at the port the job comment names)
for its queue, arrival rate and settings, builds a ``ClusterView`` of this
node's GPUs and those instances (``NodeLocalView``; instance id = Slurm job
id), calls the policy, and carries the ``GpuSettings`` out in three steps:

1. the clock and SM shares go to ``NodeAgent.plan_settings``; the agent's
   tick puts the clock in force under its rules (a lower clock only after the
   hold time, a higher one at once);
2. each model server is told the clock now in force and the policy's batch
   cap and prefill chunk (``POST /admin/settings``) whenever what it reports
   differs, so a lost message is re-sent on the next tick;
3. what was applied is recorded as a decision (the database, when the node
   has one; keys are Slurm job ids).

A running instance's SM share stays the one it started with: an MPS client's
share is fixed when its CUDA context is created, so the policy is built with
``PolicyContext(live_share_change=False)`` (``[node] live_share_change``) and
a share it asks for that differs from the running one is kept as the job's
wanted share in the node's state (``desired_sm_pct``, logged once per
change), for festinad to restart the instance at. Only with
``live_share_change`` (a site engine with its own mechanism) does the agent
put shares in force at safe points and the server hear ``sm_pct`` too.

After the agent's tick, the controller hands each GPU's jobs and their reports
to an optional ``activity`` callback: on a node without GPUs, festina-node wires it
to the simulated backend so that its power follows what the servers report
(idle, prefill, decode) instead of a fixed workload.

A server festinad started answers ``/admin/settings`` and the full ``/health``
only with its instance's secret (``serve/secret.py``): the controller reads it
from ``<secret_dir>/instance-<label>.secret`` (the label from the job comment;
``JobSecrets``), and only when that file belongs to the job's own user, since a
comment is the user's to write and root must not hand another instance's secret
to the port a comment names. A secured server that the controller holds no
secret for is left as it is (its open ``/health`` tells nothing of its queue).

Nothing here trusts a server: its answer is type-checked, and the PID it
reports is recorded (what ``drain_instance`` signals) only when ``/proc``
shows that process belongs to the job. A server that does not answer, a
policy that raises, a setting that fails: each is logged and the tick goes
on (fail open).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from festina_hpc.errors import FestinaError
from festina_hpc.node.agent import NodeAgent, TickReport
from festina_hpc.node.errors import NodeError, NodeInputError
from festina_hpc.node.state import GpuRecord, JobOnGpu, NodeState
from festina_hpc.policy.base import Policy
from festina_hpc.policy.types import GpuSettings, InstancePhase, ModelInfo, NodePower, Slo
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.secret import read_owned_secret, secret_path

logger = logging.getLogger(__name__)

NODE_ID = 0  # the view holds one node: this one


# -- what a model server reports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerReport:
    """A model server's ``/health`` answer, checked; a setting it does not report is None."""

    model: str
    running: int
    waiting: int
    pending_prompt_tokens: int
    arrival_rate_per_s: float = 0.0
    sm_pct: float | None = None
    clock_mhz: int | None = None
    batch_cap: int | None = None
    chunk_tokens: int | None = None
    pid: int | None = None


def _count(body: Mapping[str, Any], key: str, default: int | None = 0) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NodeInputError(f"/health {key} = {value!r} is not a non-negative integer")
    return value


def parse_health(body: Any) -> ServerReport:
    """The report in a ``/health`` JSON body; ``NodeInputError`` names the first bad field."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise NodeInputError("/health answer is not a JSON object naming its model")
    rate = body.get("arrival_rate_per_s", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
        raise NodeInputError(f"/health arrival_rate_per_s = {rate!r} is not a rate")
    sm_pct = body.get("sm_pct")
    if sm_pct is not None and (isinstance(sm_pct, bool) or not isinstance(sm_pct, int | float)
                               or not 0 < sm_pct <= 100):
        raise NodeInputError(f"/health sm_pct = {sm_pct!r} is not a share")
    pid = _count(body, "pid", None)
    return ServerReport(model=body["model"], running=_count(body, "running") or 0,
                        waiting=_count(body, "waiting") or 0,
                        pending_prompt_tokens=_count(body, "pending_prompt_tokens") or 0,
                        arrival_rate_per_s=float(rate), sm_pct=None if sm_pct is None else float(sm_pct),
                        clock_mhz=_count(body, "clock_mhz", None), batch_cap=_count(body, "batch_cap", None),
                        chunk_tokens=_count(body, "chunk_tokens", None), pid=pid or None)


class ModelServers(Protocol):
    """The model servers of this node's jobs, by port (on loopback); ``secret``: the instance's, if any."""

    def health(self, port: int, secret: str | None = None) -> ServerReport:
        """Its report; ``NodeError`` when it does not answer, is not serving or keeps its report to the secret."""
        ...

    def apply(self, port: int, settings: Mapping[str, float | int], secret: str | None = None) -> None:
        """``POST /admin/settings``; ``NodeError`` when refused or unreachable."""
        ...


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


USER_SECRET_DIR = ".festina"  # in a user's home: their own serving jobs' secret files (docs/user-guide.md)


class JobSecrets:
    """The secret of a job's model server, from the first of ``<secret_dir>/instance-<label>.secret`` (festinad's
    instances) and ``~<job user>/.festina/instance-<label>.secret`` (a user's own job) that the job's user owns
    and no one else may read (module docstring); None when neither is."""

    def __init__(self, secret_dir: str, home_of: Callable[[int], str | None] | None = None):
        self._dir = secret_dir
        self._home_of = home_of or _home

    def __call__(self, job: JobOnGpu) -> str | None:
        if job.instance is None or not _LABEL.fullmatch(job.instance):
            return None
        home = self._home_of(job.uid)
        dirs = [d for d in (self._dir, home and str(Path(home) / USER_SECRET_DIR)) if d]
        for directory in dirs:
            secret = read_owned_secret(secret_path(directory, job.instance), job.uid)
            if secret is not None:
                return secret
        return None


def _home(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return None


class HttpModelServers:
    """``ModelServers`` over HTTP to ``127.0.0.1:<port>``: servers bind 0.0.0.0 or loopback on their node."""

    def __init__(self, timeout_s: float = 1.0, host: str = "127.0.0.1"):
        self._timeout_s = timeout_s
        self._host = host

    def _call(self, port: int, path: str, body: Mapping[str, Any] | None = None, secret: str | None = None) -> Any:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise NodeInputError(f"port {port!r} is not a TCP port")
        url = f"http://{self._host}:{port}{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout_s) as resp:  # noqa: S310 - http to loopback
                return json.loads(resp.read(65536))
        except urllib.error.HTTPError as exc:
            raise NodeError(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise NodeError(f"{url}: {getattr(exc, 'reason', exc)}") from None

    def health(self, port: int, secret: str | None = None) -> ServerReport:
        body = self._call(port, "/health", secret=secret)
        if isinstance(body, dict) and "running" not in body:
            # A secured server's open answer: no queue to plan with, and reading it as idle would be wrong.
            raise NodeError(f"127.0.0.1:{port}/health reports its queue only with its instance secret")
        return parse_health(body)

    def apply(self, port: int, settings: Mapping[str, float | int], secret: str | None = None) -> None:
        self._call(port, "/admin/settings", settings, secret)


def job_owns_pid(pid: int, job_id: int) -> bool:
    """Whether process ``pid`` runs in Slurm job ``job_id`` (its environment says so; root reads any)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"SLURM_JOB_ID={job_id}".encode() in environ.split(b"\0")


# -- the policy's view of this node ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalInstance:
    """A serving job as an ``InstanceView``: the state file's share, the server's queue and knobs."""

    id: int
    model: str
    gpus: tuple[int, ...]
    sm_pct: float
    batch_cap: int
    chunk_tokens: int
    running: int
    waiting: int
    pending_prompt_tokens: int
    arrival_rate_per_s: float
    last_busy_s: float
    node: int = NODE_ID
    phase: InstancePhase = InstancePhase.READY
    memory_fraction: float = 1.0
    kv_tokens_reserved: int = 0
    kv_capacity_tokens: int = 0  # not known on the node; control() does not read it
    ready_at_s: float = 0.0


@dataclass(frozen=True)
class LocalGpu:
    id: int
    clock_mhz: int
    instances: tuple[int, ...]
    sm_pct_allocated: float  # every job's share, steered or not
    node: int = NODE_ID
    memory_fraction_allocated: float = 0.0


@dataclass(frozen=True)
class LocalNode:
    gpus: tuple[int, ...]
    id: int = NODE_ID
    power: NodePower = NodePower.ON
    ready_at_s: float = 0.0

    def has_cached(self, model: str) -> bool:
        return False


@dataclass(frozen=True)
class NodeLocalView:
    """A ``ClusterView`` of one node: its GPUs (by index) and the serving jobs that answered this tick."""

    now_s: float
    gpu_type: str
    model_info: Mapping[str, ModelInfo]
    instance_map: Mapping[int, LocalInstance]
    gpu_list: tuple[LocalGpu, ...]
    rates: Mapping[str, float] = field(default_factory=dict)

    def model(self, name: str) -> ModelInfo:
        return self.model_info[name]

    def models(self) -> Iterable[ModelInfo]:
        return self.model_info.values()

    def instance(self, instance_id: int) -> LocalInstance:
        return self.instance_map[instance_id]

    def instances(self) -> Iterable[LocalInstance]:
        return self.instance_map.values()

    def instances_of(self, model: str) -> Sequence[LocalInstance]:
        return [i for i in self.instance_map.values() if i.model == model]

    def gpu(self, gpu_id: int) -> LocalGpu:
        return next(g for g in self.gpu_list if g.id == gpu_id)

    def gpus(self) -> Sequence[LocalGpu]:
        return self.gpu_list

    def node(self, node_id: int) -> LocalNode:
        return LocalNode(tuple(g.id for g in self.gpu_list))

    def nodes(self) -> Sequence[LocalNode]:
        return [self.node(NODE_ID)]

    def free_gpus(self) -> Iterable[int]:
        return (g.id for g in self.gpu_list if not g.instances)

    def model_rate_per_s(self, model: str) -> float:
        return self.rates.get(model, 0.0)


# -- the controller -------------------------------------------------------------------------------------------


GpuActivity = Callable[[int, Sequence[tuple[JobOnGpu, ServerReport | None]]], None]
"""Told, per GPU index, each job on it and its server's report this tick (None: no port, or no answer)."""


class DecisionSink(Protocol):
    """Where applied settings are recorded (the database)."""

    def settings(self, node: str, gpu_index: int, settings: GpuSettings, reason: str) -> None: ...


@dataclass(frozen=True)
class ControlReport:
    """What one controlled tick did, beyond the agent's own tick."""

    tick: TickReport
    decided: Mapping[int, GpuSettings] = field(default_factory=dict)  # GPU index -> the policy's settings
    told: Mapping[int, Mapping[str, float | int]] = field(default_factory=dict)  # job id -> settings sent
    unreachable: tuple[int, ...] = ()  # job ids whose server did not answer


class LocalController:
    """Runs ``policy.control()`` per GPU of this node and carries it out (see the module docstring)."""

    def __init__(self, policy: Policy, store: ProfileStore, gpu_type: str, servers: ModelServers, *,
                 slo_for: Callable[[str], Slo], owns_pid: Callable[[int, int], bool] = job_owns_pid,
                 decisions: DecisionSink | None = None, clock: Callable[[], float] = time.time,
                 activity: GpuActivity | None = None, secret_of: Callable[[JobOnGpu], str | None] | None = None):
        """The policy's ``context.live_share_change`` says whether servers take a new share (module docstring);
        ``secret_of`` gives a job's server secret (``JobSecrets``; None: servers are called without one)."""
        self._policy = policy
        self._live_share_change = policy.context.live_share_change
        self._store = store
        self._spec = store.gpu(gpu_type)
        self._servers = servers
        self._slo_for = slo_for
        self._owns_pid = owns_pid
        self._decisions = decisions
        self._clock = clock
        self._activity = activity
        self._secret_of = secret_of or (lambda job: None)
        self._models: dict[str, ModelInfo] = {}

    @property
    def policy(self) -> Policy:
        return self._policy

    def _model_info(self, name: str) -> ModelInfo | None:
        """The model as the policy knows it, None when it has no profile on this GPU (left alone)."""
        if name not in self._models:
            try:
                spec = self._store.model(name)
                self._store.table(self._spec.name, spec.name)
                self._models[name] = ModelInfo.on_gpu(spec, self._spec.name, self._slo_for(spec.name))
            except FestinaError as exc:
                logger.warning("model %s: not controlled here: %s", name, exc)
                return None
        return self._models[name]

    def _clock_of(self, rec: GpuRecord) -> int:
        return rec.clock_mhz if rec.clock_mhz is not None else self._spec.max_clock_mhz

    def view(self, state: NodeState, reports: Mapping[int, ServerReport], now_s: float) -> NodeLocalView:
        """This node as the policy sees it: every GPU with jobs; instances = jobs whose server answered."""
        instances: dict[int, LocalInstance] = {}
        gpus: list[LocalGpu] = []
        infos: dict[str, ModelInfo] = {}
        for index, rec in sorted(state.gpus.items()):
            steered: list[int] = []
            for job in rec.jobs:
                report = reports.get(job.job_id)
                info = None if report is None else self._model_info(report.model)
                if report is None or info is None:
                    continue
                infos[info.name] = info
                inst = instances.get(job.job_id)
                gpus_of = (*inst.gpus, index) if inst is not None else (index,)
                instances[job.job_id] = LocalInstance(
                    id=job.job_id, model=info.name, gpus=gpus_of, sm_pct=job.sm_pct,
                    batch_cap=report.batch_cap or 256, chunk_tokens=report.chunk_tokens or 2048,
                    running=report.running, waiting=report.waiting,
                    pending_prompt_tokens=report.pending_prompt_tokens,
                    arrival_rate_per_s=report.arrival_rate_per_s, last_busy_s=now_s)
                steered.append(job.job_id)
            gpus.append(LocalGpu(index, self._clock_of(rec), tuple(steered), sum(j.sm_pct for j in rec.jobs)))
        rates: dict[str, float] = {}
        for inst in instances.values():
            rates[inst.model] = rates.get(inst.model, 0.0) + inst.arrival_rate_per_s
        return NodeLocalView(now_s, self._spec.name, infos, instances, tuple(gpus), rates)

    def _poll(self, jobs: Iterable[JobOnGpu]) -> tuple[dict[int, ServerReport], list[int]]:
        reports: dict[int, ServerReport] = {}
        unreachable: list[int] = []
        for job in jobs:
            if job.port is None or job.job_id in reports:
                continue
            try:
                reports[job.job_id] = self._servers.health(job.port, self._secret_of(job))
            except FestinaError as exc:
                logger.info("job %d: model server on port %d not answering (%s); left as it is", job.job_id,
                            job.port, exc)
                unreachable.append(job.job_id)
        return reports, unreachable

    def step(self, agent: NodeAgent) -> ControlReport:
        """One controlled tick: decide per GPU, let the agent put it in force, tell the servers, record."""
        now_s = self._clock()
        state = agent.status()
        reports, unreachable = self._poll(j for rec in state.gpus.values() for j in rec.jobs)
        view = self.view(state, reports, now_s)
        decided: dict[int, GpuSettings] = {}
        for gpu in view.gpus():
            if not gpu.instances:
                continue
            try:
                settings = self._policy.control(gpu, view)
                pids = {j: p for j in gpu.instances if (p := reports[j].pid) is not None and self._owns_pid(p, j)}
                clock = None if settings is None or settings.clock_mhz == gpu.clock_mhz else settings.clock_mhz
                agent.plan_settings(gpu.id, clock, {} if settings is None else settings.sm_pct, pids)
            except Exception:  # noqa: BLE001 - fail open: one GPU's policy or state error must not stop the rest
                logger.exception("GPU %d: local control failed; settings left as they are", gpu.id)
                continue
            if settings is not None:
                decided[gpu.id] = settings
        tick = agent.control_tick()
        in_force = agent.status()
        # After the tick: a share change there re-announces the GPU's jobs (the agent's jobs_changed), which
        # would otherwise overwrite the activity; and the shares handed on are those now in force.
        self._report_activity(in_force, reports)
        told = self._tell_servers(in_force, reports, decided)
        self._record(agent.node, view, tick, decided, told)
        return ControlReport(tick, decided, told, tuple(unreachable))

    def _report_activity(self, state: NodeState, reports: Mapping[int, ServerReport]) -> None:
        """Hand every GPU's jobs and their reports to the activity callback; a failure is logged, not raised."""
        if self._activity is None:
            return
        for index, rec in sorted(state.gpus.items()):
            try:
                self._activity(index, [(job, reports.get(job.job_id)) for job in rec.jobs])
            except Exception:  # noqa: BLE001 - fail open: reporting activity must not stop the control of GPUs
                logger.exception("GPU %d: activity not reported", index)

    def _tell_servers(self, state: NodeState, reports: Mapping[int, ServerReport],
                      decided: Mapping[int, GpuSettings]) -> dict[int, dict[str, float | int]]:
        """Send each server the clock in force (and the policy's batch cap and chunk) where it differs.

        The share goes too only with ``live_share_change``: an engine without its own mechanism refuses
        a new one (the emulated engine answers 409), and that would refuse the clock sent with it.
        """
        told: dict[int, dict[str, float | int]] = {}
        for index, rec in sorted(state.gpus.items()):
            settings = decided.get(index, GpuSettings())
            for job in rec.jobs:
                report = reports.get(job.job_id)
                if report is None or job.port is None or job.job_id in told:
                    continue
                target: dict[str, float | int] = {"clock_mhz": self._clock_of(rec)}
                if self._live_share_change:
                    target["sm_pct"] = job.sm_pct
                if job.job_id in settings.batch_cap:
                    target["batch_cap"] = settings.batch_cap[job.job_id]
                if job.job_id in settings.chunk_tokens:
                    target["chunk_tokens"] = settings.chunk_tokens[job.job_id]
                reported: dict[str, float | None] = {"sm_pct": report.sm_pct, "clock_mhz": report.clock_mhz,
                                                     "batch_cap": report.batch_cap, "chunk_tokens": report.chunk_tokens}
                changes = {k: v for k, v in target.items()
                           if (now := reported[k]) is None or abs(now - v) > 1e-6}
                if not changes:
                    continue
                try:
                    self._servers.apply(job.port, changes, self._secret_of(job))
                    told[job.job_id] = changes
                except FestinaError as exc:
                    logger.warning("job %d: model server on port %d not told %s: %s", job.job_id, job.port,
                                   changes, exc)
        return told

    def _record(self, node: str, view: NodeLocalView, tick: TickReport, decided: Mapping[int, GpuSettings],
                told: Mapping[int, Mapping[str, float | int]]) -> None:
        """One decision per GPU whose clock, shares, batch caps or chunks changed this tick."""
        for gpu in view.gpus():
            shares = {j: pct for j, pct in tick.share_changes.items() if j in gpu.instances}
            caps = {j: int(t["batch_cap"]) for j, t in told.items() if j in gpu.instances and "batch_cap" in t}
            chunks = {j: int(t["chunk_tokens"]) for j, t in told.items()
                      if j in gpu.instances and "chunk_tokens" in t}
            clock = tick.clock_changes.get(gpu.id)
            if clock is None and not shares and not caps and not chunks:
                continue
            applied = GpuSettings(clock_mhz=clock, sm_pct=shares, batch_cap=caps, chunk_tokens=chunks)
            logger.info("%s GPU %d: applied %s", node, gpu.id, applied)
            if self._decisions is None:
                continue
            try:
                self._decisions.settings(node, gpu.id, applied, f"festina-node {node} local control "
                                                                f"(instance keys are Slurm job ids)")
            except FestinaError as exc:
                logger.warning("%s GPU %d: decision not recorded: %s", node, gpu.id, exc)
