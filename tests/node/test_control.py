"""The local controller on a node agent over simulated GPUs, with fake model servers: decide, apply, tell, record."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from festina_hpc.cluster.slo import default_slo
from festina_hpc.gpu.base import Workload
from festina_hpc.node.agent import NodeAgent
from festina_hpc.node.config import NodeConfig, NodePaths
from festina_hpc.node.control import (
    GpuActivity,
    HttpModelServers,
    JobSecrets,
    LocalController,
    ServerReport,
    parse_health,
)
from festina_hpc.node.errors import NodeError, NodeInputError
from festina_hpc.node.hookenv import Directives, JobContext
from festina_hpc.node.main import (
    DEFAULT_BATCH,
    DEFAULT_CONTEXT_TOKENS,
    Invocation,
    _simulated_activity,
    _simulated_workloads,
    build_node,
)
from festina_hpc.node.simulated import PersistentSimulatedGpu
from festina_hpc.policy.base import Policy, PolicyContext, make_policy
from festina_hpc.policy.types import ClusterView, Drop, GpuSettings, GpuView, Placement, Request
from festina_hpc.profiles.store import ProfileStore
from festina_hpc.serve.secret import write_secret
from tests.conftest import REPO_PROFILES
from tests.node.conftest import SimNode

GPU = "h100-sxm-80gb"
MODEL = "llama-3.1-8b"
DECODING = ServerReport(MODEL, running=16, waiting=0, pending_prompt_tokens=0, arrival_rate_per_s=0.2,
                        sm_pct=50.0, clock_mhz=1980, batch_cap=256, chunk_tokens=2048, pid=4242)
PREFILL_BURST = replace(DECODING, running=8, waiting=24, pending_prompt_tokens=40000, arrival_rate_per_s=8.0)


@dataclass
class FakeServers:
    reports: dict[int, ServerReport]  # port -> what /health says
    applied: list[tuple[int, dict[str, float | int]]] = field(default_factory=list)
    down: set[int] = field(default_factory=set)
    secrets: list[tuple[str, int, str | None]] = field(default_factory=list)  # (call, port, secret sent)

    def health(self, port: int, secret: str | None = None) -> ServerReport:
        self.secrets.append(("health", port, secret))
        if port in self.down:
            raise NodeError(f"port {port}: connection refused")
        return self.reports[port]

    def apply(self, port: int, settings: Mapping[str, float | int], secret: str | None = None) -> None:
        self.secrets.append(("apply", port, secret))
        if port in self.down:
            raise NodeError(f"port {port}: connection refused")
        self.applied.append((port, dict(settings)))
        changed: dict[str, Any] = dict(settings)
        self.reports[port] = replace(self.reports[port], **changed)  # reported from now on, as a server does


@dataclass
class FakeDecisions:
    recorded: list[tuple[str, int, GpuSettings]] = field(default_factory=list)

    def settings(self, node: str, gpu_index: int, settings: GpuSettings, reason: str) -> None:
        self.recorded.append((node, gpu_index, settings))


def serving_job(job_id: int, gpu: int, port: int, mps_pct: int = 50) -> JobContext:
    return JobContext(job_id, 0, "root", "n1", (gpu,), mps_pct, Directives(MODEL, str(job_id), None, port))


def controller(servers: FakeServers, decisions: FakeDecisions | None = None,
               owns: bool = True, activity: GpuActivity | None = None, live_share_change: bool = False,
               policy: Policy | None = None, secret_of: Any = None) -> LocalController:
    store = ProfileStore(REPO_PROFILES)
    policy = policy or make_policy("festina", PolicyContext(store, GPU, live_share_change=live_share_change))
    return LocalController(policy, store, GPU, servers, slo_for=lambda m: default_slo(store, GPU, m),
                           owns_pid=lambda pid, job: owns, decisions=decisions, activity=activity,
                           secret_of=secret_of)


class WantsShare(Policy):
    """Every instance at ``sm_pct``, with a fixed clock and batch cap: a share other than the running one."""

    name = "wants-share"

    def __init__(self, context: PolicyContext, sm_pct: float, clock_mhz: int = 1410, batch_cap: int = 64):
        super().__init__(context)
        self.sm_pct, self.clock_mhz, self.batch_cap = sm_pct, clock_mhz, batch_cap

    def place(self, request: Request, view: ClusterView) -> Placement:
        return Drop("not placed on a node")

    def control(self, gpu: GpuView, view: ClusterView) -> GpuSettings:
        return GpuSettings(clock_mhz=self.clock_mhz, sm_pct={i: self.sm_pct for i in gpu.instances},
                           batch_cap={i: self.batch_cap for i in gpu.instances})


def live_agent(n: SimNode) -> NodeAgent:
    """The fixture's node with an engine that changes a running instance's share itself."""
    return NodeAgent("n1", n.gpu, n.mps, n.state, n.paths, slurm=n.slurm,
                     jobs_changed=_simulated_workloads(n.gpu, ProfileStore(REPO_PROFILES), MODEL),
                     clock_min_interval_s=10.0, clock=n.clock, live_share_change=True)


def shares(n: SimNode, gpu: int) -> dict[int, float]:
    return {j.job_id: j.sm_pct for j in n.state.read().gpu(gpu).jobs}


def test_decode_only_gpu_runs_slower_than_one_with_a_prefill_burst_and_shares_stay_as_started(
        sim_node: SimNode) -> None:
    n = sim_node
    # The decoders start with shares at which a lower clock keeps their SLOs (held fixed, a share
    # at which only the max clock does would leave the controller nothing to lower).
    servers = FakeServers({9001: replace(DECODING, sm_pct=50.0), 9002: replace(DECODING, sm_pct=50.0),
                           9003: replace(PREFILL_BURST, sm_pct=30.0), 9004: replace(DECODING, sm_pct=60.0)})
    decisions = FakeDecisions()
    started = {11: 50.0, 12: 50.0, 21: 30.0, 22: 60.0}
    for job_id, gpu, port in ((11, 0, 9001), (12, 0, 9002), (21, 1, 9003), (22, 1, 9004)):
        n.agent.prolog(serving_job(job_id, gpu, port, round(started[job_id])))
    ctl = controller(servers, decisions)
    for _ in range(3):
        report = ctl.step(n.agent)
        assert report.tick.share_changes == {}
        n.clock.advance(2.0)
    decode_mhz, burst_mhz = n.gpu.current_clock_mhz(0), n.gpu.current_clock_mhz(1)
    assert decode_mhz < burst_mhz == n.gpu.spec.max_clock_mhz
    assert {**shares(n, 0), **shares(n, 1)} == started  # no share changes in place
    # The servers were told the clock in force, never a share; MPS was not asked to change one.
    told: dict[int, dict[str, float | int]] = {port: {} for port in servers.reports}
    for port, settings in servers.applied:
        told[port].update(settings)
    assert told[9001]["clock_mhz"] == decode_mhz and "clock_mhz" not in told[9003]  # only what differs
    assert not any("sm_pct" in settings for _, settings in servers.applied)
    assert all((daemon := n.mps.daemon(gpu)) is not None and daemon["server_pct"] == {} for gpu in (0, 1))
    recorded = {(gpu, s.clock_mhz) for _, gpu, s in decisions.recorded}
    assert (0, decode_mhz) in recorded and not any(s.sm_pct for _, _, s in decisions.recorded)


def test_a_share_the_policy_wants_is_recorded_as_wanted_and_never_set_on_the_running_server(
        sim_node: SimNode, caplog: pytest.LogCaptureFixture) -> None:
    n = sim_node
    servers = FakeServers({9001: replace(DECODING, sm_pct=50.0)})
    decisions = FakeDecisions()
    n.agent.prolog(serving_job(11, 0, 9001, mps_pct=50))
    policy = WantsShare(PolicyContext(ProfileStore(REPO_PROFILES), GPU), sm_pct=30.0)
    ctl = controller(servers, decisions, policy=policy)
    with caplog.at_level(logging.INFO, logger="festina_hpc.node.agent"):
        for _ in range(3):
            assert ctl.step(n.agent).tick.share_changes == {}
            n.clock.advance(2.0)
        policy.sm_pct = 40.0
        ctl.step(n.agent)
    (job,) = n.state.read().gpu(0).jobs
    assert (job.sm_pct, job.desired_sm_pct, job.server_pid) == (50.0, 40.0, 4242)  # wanted, not in force
    daemon = n.mps.daemon(0)
    assert daemon is not None and daemon["server_pct"] == {}  # no set_active_thread_percentage on its pid
    # Clock and batch cap are live settings: they applied; the share was never sent.
    assert n.gpu.current_clock_mhz(0) == 1410
    assert servers.applied == [(9001, {"clock_mhz": 1410, "batch_cap": 64})]
    assert [s for _, _, s in decisions.recorded] == [GpuSettings(clock_mhz=1410, batch_cap={11: 64})]
    wanted = [r.getMessage() for r in caplog.records if "wants an SM share" in r.getMessage()]
    assert len(wanted) == 2 and "of 30% (runs at 50%)" in wanted[0] and "of 40%" in wanted[1]  # once per change


def test_with_live_share_change_shares_change_at_safe_points_without_mps(sim_node: SimNode) -> None:
    """A site engine with its own mechanism: the ledger takes the share (shrinks first), the server hears it."""
    n = sim_node
    agent = live_agent(n)
    servers = FakeServers({9003: replace(PREFILL_BURST, sm_pct=30.0), 9004: replace(DECODING, sm_pct=60.0)})
    agent.prolog(serving_job(21, 1, 9003, 30))
    agent.prolog(serving_job(22, 1, 9004, 60))
    ctl = controller(servers, live_share_change=True)
    changes = []
    for _ in range(3):
        changes.append(dict(ctl.step(agent).tick.share_changes))
        assert sum(shares(n, 1).values()) <= 100.0
        n.clock.advance(2.0)
    # GPU 1 was full: the burst's grow waited for the other job's shrink (an earlier tick).
    assert shares(n, 1)[21] > 30 and shares(n, 1)[22] < 60
    shrunk_at = next(t for t, c in enumerate(changes) if 22 in c)
    grown_at = next(t for t, c in enumerate(changes) if 21 in c)
    assert shrunk_at < grown_at
    told: dict[int, dict[str, float | int]] = {port: {} for port in servers.reports}
    for port, settings in servers.applied:
        told[port].update(settings)
    assert told[9003]["sm_pct"] == shares(n, 1)[21] and told[9004]["sm_pct"] == shares(n, 1)[22]
    daemon = n.mps.daemon(1)
    assert daemon is not None and daemon["server_pct"] == {}  # the engine's mechanism, not MPS


def test_an_unreachable_server_is_left_alone_and_the_rest_is_controlled(sim_node: SimNode) -> None:
    n = sim_node
    servers = FakeServers({9001: DECODING, 9002: DECODING}, down={9002})
    n.agent.prolog(serving_job(11, 0, 9001, mps_pct=30))
    n.agent.prolog(serving_job(12, 0, 9002, mps_pct=60))
    n.agent.prolog(JobContext(13, 0, "root", "n1", (1,), 30, Directives()))  # not a serving job: no port
    policy = WantsShare(PolicyContext(ProfileStore(REPO_PROFILES), GPU), sm_pct=80.0)
    report = controller(servers, owns=False, policy=policy).step(n.agent)
    assert report.unreachable == (12,)
    assert shares(n, 0) == {11: 30.0, 12: 60.0} and shares(n, 1)[13] == 30.0
    wanted = {j.job_id: j.desired_sm_pct for j in n.state.read().gpu(0).jobs}
    assert wanted == {11: 40.0, 12: None}  # only the room the silent job leaves
    assert n.state.read().gpu(0).jobs[0].server_pid is None  # the pid was not the job's: not recorded
    assert {port for port, _ in servers.applied} == {9001}


@pytest.mark.parametrize("body, problem", [
    ([], "JSON object"),
    ({"model": MODEL, "running": -1}, "running"),
    ({"model": MODEL, "arrival_rate_per_s": "fast"}, "arrival_rate_per_s"),
    ({"model": MODEL, "sm_pct": 300}, "sm_pct"),
    ({"model": MODEL, "pid": True}, "pid"),
])
def test_a_bad_health_answer_is_refused(body: object, problem: str) -> None:
    with pytest.raises(NodeInputError, match=problem):
        parse_health(body)


def test_a_health_answer_of_the_emulated_server_parses() -> None:
    report = parse_health({"status": "ok", "model": MODEL, "running": 2, "waiting": 1, "pending_prompt_tokens": 30,
                           "arrival_rate_per_s": 0.5, "sm_pct": 40.0, "clock_mhz": 1410, "batch_cap": 64,
                           "chunk_tokens": 512, "pid": 77, "in_flight": 3})
    assert report == ServerReport(MODEL, 2, 1, 30, 0.5, 40.0, 1410, 64, 512, 77)


def test_simulated_power_follows_what_the_servers_report_and_attribution_still_sums(sim_node: SimNode) -> None:
    n = sim_node
    idle = replace(DECODING, running=0, waiting=0, pending_prompt_tokens=0, arrival_rate_per_s=0.0)
    busy = replace(DECODING, running=128)
    servers = FakeServers({9001: idle, 9002: busy, 9003: DECODING}, down={9003})
    n.agent.prolog(serving_job(11, 0, 9001, mps_pct=50))
    n.agent.prolog(serving_job(21, 1, 9002, mps_pct=50))
    n.agent.prolog(serving_job(22, 1, 9003, mps_pct=50))
    start_j = [n.gpu.energy_j(i) for i in (0, 1)]
    idle_w = n.gpu.spec.idle_w
    assert n.gpu.power_w(0) > idle_w  # the job-change path's fixed decode batch, before any server reported
    store = ProfileStore(REPO_PROFILES)
    ctl = controller(servers, activity=_simulated_activity(n.gpu, store, GPU, MODEL))
    readings = []
    for _ in range(3):
        ctl.step(n.agent)
        n.clock.advance(5.0)
        readings.append([n.gpu.energy_j(i) for i in (0, 1)])
    assert n.gpu.workloads(0) == ()
    assert n.gpu.power_w(0) == pytest.approx(idle_w)  # an idle server: the GPU draws idle power
    # The silent server keeps the default workload; the busy one decodes its running batch, drawing more.
    by_job = {w.batch: w for w in n.gpu.workloads(1)}
    assert by_job[DEFAULT_BATCH] == Workload(MODEL, "decode", DEFAULT_BATCH, DEFAULT_CONTEXT_TOKENS,
                                             by_job[DEFAULT_BATCH].sm_pct)
    assert by_job[128].phase == "decode"
    # More than the fixed default draws at the clock and shares the policy has put in force meanwhile.
    busy_w = n.gpu.power_w(1)
    _simulated_workloads(n.gpu, store, MODEL)(1, n.state.read().gpu(1).jobs)
    assert busy_w > n.gpu.power_w(1) > idle_w
    # Pending prompts are a prefill of them (one sequence, its context capped by the table's grid).
    servers.reports[9001] = PREFILL_BURST
    ctl.step(n.agent)
    (prefill,) = n.gpu.workloads(0)
    assert (prefill.phase, prefill.batch) == ("prefill", 1) and prefill.context_tokens <= 40000
    assert n.gpu.power_w(0) > idle_w
    # The counters stay monotone; each epilog's energy is the job's share of its GPU's counter delta.
    flat = [start_j, *readings]
    assert all(b >= a for before, after in zip(flat, flat[1:]) for a, b in zip(before, after))
    n.clock.advance(5.0)
    energy: dict[int, float] = {}
    for job, gpu, port in ((11, 0, 9001), (21, 1, 9002), (22, 1, 9003)):
        record = n.agent.epilog(serving_job(job, gpu, port))
        assert record is not None
        energy[job] = record.energy_j
    delta = [n.gpu.energy_j(i) - start_j[i] for i in (0, 1)]
    assert energy[11] == pytest.approx(delta[0], rel=1e-6)
    assert energy[21] + energy[22] == pytest.approx(delta[1], rel=1e-6)


class _IdleHealth(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"model": MODEL, "running": 0, "waiting": 0, "pending_prompt_tokens": 0}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test server
        pass


@pytest.fixture
def idle_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _IdleHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_simulated_node_wires_the_activity_into_its_controller(tmp_path: Path, idle_server: int) -> None:
    cfg = NodeConfig(state_dir=str(tmp_path / "state"), gpu_backend="simulated", profiles_dir=str(REPO_PROFILES))
    agent, ctl = build_node(Invocation(cfg, "n1", {}, "simulated"), with_controller=True)
    assert ctl is not None
    agent.prolog(serving_job(11, 0, idle_server))
    # Another process's view of the node's simulated GPUs, as the hooks and metrics have: the state file.
    backend = PersistentSimulatedGpu(NodePaths.of(cfg, "n1").simulated_file, ProfileStore(REPO_PROFILES), GPU, 2)
    assert backend.power_w(0) > backend.spec.idle_w  # the job change's fixed default
    ctl.step(agent)
    assert backend.power_w(0) == pytest.approx(backend.spec.idle_w)  # its server reported idle over HTTP
    agent.epilog(serving_job(11, 0, idle_server))


@pytest.mark.parametrize("live", [False, True])
def test_the_node_builds_its_policy_and_agent_with_the_configured_live_share_change(tmp_path: Path,
                                                                                   live: bool) -> None:
    cfg = NodeConfig(state_dir=str(tmp_path / "state"), gpu_backend="simulated", profiles_dir=str(REPO_PROFILES),
                     live_share_change=live)
    agent, ctl = build_node(Invocation(cfg, "n1", {}, "simulated"), with_controller=True)
    assert ctl is not None
    assert ctl.policy.context.live_share_change is live and agent.live_share_change is live


def test_each_server_is_called_with_its_own_secret_and_only_its_users_file_counts(sim_node: SimNode,
                                                                                 tmp_path: Path) -> None:
    n = sim_node
    secret_dir = tmp_path / "secrets"
    _, mine = write_secret(secret_dir, "11")  # festinad's instance 11, run as the job's user (uid 0 here)
    write_secret(secret_dir, "12")
    servers = FakeServers({9001: DECODING, 9002: DECODING, 9003: DECODING})
    n.agent.prolog(serving_job(11, 0, 9001, mps_pct=30))
    # Another user's job whose comment names festinad's instance 12: root must not send it 12's secret.
    n.agent.prolog(JobContext(12, os.getuid() + 1000, "mallory", "n1", (0,), 30, Directives(MODEL, "12", None, 9002)))
    n.agent.prolog(JobContext(13, 0, "root", "n1", (1,), 30, Directives(MODEL, "../12", None, 9003)))
    policy = WantsShare(PolicyContext(ProfileStore(REPO_PROFILES), GPU), sm_pct=30.0, batch_cap=8)
    controller(servers, policy=policy, secret_of=JobSecrets(str(secret_dir), home_of=lambda uid: None)).step(n.agent)
    sent = {(call, port): secret for call, port, secret in servers.secrets}
    assert sent[("health", 9001)] == mine and sent[("apply", 9001)] == mine
    assert sent[("health", 9002)] is None and sent[("apply", 9002)] is None
    assert sent[("health", 9003)] is None  # a label that is not one word names no file
    assert JobSecrets("", home_of=lambda uid: None)(n.state.read().gpu(0).jobs[0]) is None  # no secret_dir: none
    # A user's own job: the secret file in their home's .festina, by the job's label.
    home = tmp_path / "home"
    _, users = write_secret(home / ".festina", "11")
    assert JobSecrets("", home_of=lambda uid: str(home))(n.state.read().gpu(0).jobs[0]) == users


def test_http_servers_send_the_secret_and_a_secured_servers_open_health_is_no_report(tmp_path: Path) -> None:
    from festina_hpc.serve.engine import SimulatedEngine
    from festina_hpc.serve.server import simulated_server

    secret = "x" * 43
    http = HttpModelServers(timeout_s=5.0)

    async def scenario() -> None:
        engine = SimulatedEngine(ProfileStore(REPO_PROFILES), MODEL, GPU)
        async with simulated_server(engine, secret=secret) as url:
            port = int(url.rsplit(":", 1)[1])
            with pytest.raises(NodeError, match="only with its instance secret"):
                await asyncio.to_thread(http.health, port)
            report = await asyncio.to_thread(http.health, port, secret)
            assert report.model == MODEL and report.batch_cap == 256
            with pytest.raises(NodeError, match="HTTP 401"):
                await asyncio.to_thread(http.apply, port, {"batch_cap": 8})
            await asyncio.to_thread(http.apply, port, {"batch_cap": 8}, secret)
            assert (engine.pending_settings or engine.settings).batch_cap == 8

    asyncio.run(scenario())
