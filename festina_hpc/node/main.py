"""Entry point of ``festina-node``: the Slurm hooks, the root-owned control service, status and requests.

``main()`` is the only place that reads the environment (the hook variables,
``FESTINA_GPU_BACKEND``, ``FESTINA_NODE_CONFIG``, ``SLURM_CONF``) and builds
the backends it passes in. The hook commands fail open: whatever goes wrong
inside festina is logged (stderr, which the hook scripts append to their log;
syslog with ``--syslog``, for a task prolog whose user may not write that log),
one line per record (``HookLogFormatter``), a refused job environment as one
line naming the variable and never a traceback, and the exit status is 0,
because a failing Prolog or Epilog drains the node.
The one exception is a GPU that is unusable (``GpuLostError``): then the node
is drained through the Slurm client, with a reason Slurm shows, and the hook
still exits 0 so that Slurm keeps our reason instead of "Prolog error".
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import pwd
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from festina_hpc.errors import FestinaError, GpuError, GpuLostError
from festina_hpc.gpu.base import GpuBackend, MpsControl, Workload
from festina_hpc.logs import configure_logging
from festina_hpc.node.agent import (
    EnergySink,
    JobsChanged,
    NodeAgent,
    TickReport,
    task_prolog_lines,
    task_prolog_refusal,
)
from festina_hpc.node.config import CONFIG_NAME, NodeConfig, NodePaths, load_node_config
from festina_hpc.node.control import DecisionSink, GpuActivity, LocalController, ServerReport
from festina_hpc.node.errors import NodeError, NodeInputError
from festina_hpc.node.hookenv import HookLogFormatter, escape_controls, job_context
from festina_hpc.node.state import JobOnGpu, StateFile, as_plain
from festina_hpc.policy.types import Slo

logger = logging.getLogger("festina_hpc.node")

HOOK_LOG_FORMAT = "%(asctime)s festina-node[%(process)d] %(levelname)s %(message)s"
SYSLOG_FORMAT = "festina-node[%(process)d]: %(levelname)s %(message)s"  # syslog adds the time
SYSLOG_SOCKET = "/dev/log"


def log_handler(syslog_socket: str | None = None) -> logging.Handler:
    """festina-node's one log handler: stderr (the hook scripts append it to the hook log), or syslog at
    ``syslog_socket`` when asked and there is one; either way through ``HookLogFormatter``, one line a record."""
    # SysLogHandler takes a missing socket silently and drops every record: no syslog here (a container) means
    # stderr, which the task prolog script then discards.
    if syslog_socket is not None and Path(syslog_socket).is_socket():
        handler: logging.Handler = logging.handlers.SysLogHandler(syslog_socket)
        handler.setFormatter(HookLogFormatter(SYSLOG_FORMAT))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(HookLogFormatter(HOOK_LOG_FORMAT))
    return handler


@dataclass(frozen=True)
class Invocation:
    """What ``main()`` read from the command line and the environment."""

    config: NodeConfig
    node: str
    env: Mapping[str, str]
    backend_override: str | None


def find_config(option: Path | None, env: Mapping[str, str]) -> Path | None:
    if option is not None:
        return option
    if env.get("FESTINA_NODE_CONFIG"):
        return Path(env["FESTINA_NODE_CONFIG"])
    if env.get("SLURM_CONF"):
        beside = Path(env["SLURM_CONF"]).parent / CONFIG_NAME
        if beside.is_file():
            return beside
    return None


DEFAULT_BATCH = 16  # the fixed decode batch a job is assumed to run until (or unless) its server reports
DEFAULT_CONTEXT_TOKENS = 1024


def _model_of(store: Any, default_model: str, *names: str | None, gpu: str | None = None) -> str:
    """The first of ``names`` the profiles know (with a table on ``gpu``, if given), else ``default_model``."""
    for name in names:
        if name is None:
            continue
        try:
            store.model(name)
            if gpu is not None:
                store.table(gpu, name)
            return name
        except FestinaError:
            continue
    return default_model


def _default_workload(store: Any, default_model: str, job: JobOnGpu) -> Workload:
    return Workload(_model_of(store, default_model, job.model), "decode", batch=DEFAULT_BATCH,
                    context_tokens=DEFAULT_CONTEXT_TOKENS, sm_pct=job.sm_pct)


def _simulated_workloads(backend: Any, store: Any, default_model: str) -> JobsChanged:
    """Tells a simulated GPU what its jobs run: a decode batch of the job's model at its SM share."""

    def changed(index: int, jobs: Sequence[JobOnGpu]) -> None:
        backend.set_workloads(index, [_default_workload(store, default_model, job) for job in jobs])

    return changed


def _simulated_activity(backend: Any, store: Any, gpu_type: str, default_model: str) -> GpuActivity:
    """Tells a simulated GPU what its jobs' servers report doing, so that its power follows their load.

    An idle server (nothing running, no prompt pending) adds no workload: with none, the GPU draws idle
    power. Pending prompts are a prefill of them (batch 1), else a decode step of the running batch. A job
    whose server did not answer (or that serves nothing) keeps the fixed default, as on a job change.
    Batch and context are capped at the table's grid, so that the KV cache of an outsized report is not
    counted against the GPU's memory; lookups clamp there anyway.
    """
    gpu = store.gpu(gpu_type).name

    def workload(job: JobOnGpu, report: ServerReport | None) -> Workload | None:
        if report is None:
            return _default_workload(store, default_model, job)
        if report.running == 0 and report.pending_prompt_tokens == 0:
            return None
        model = _model_of(store, default_model, report.model, job.model, gpu=gpu)
        table = store.table(gpu, model)
        max_batch = int(table.bounds("batch")[1])
        max_context = int(table.bounds("context_tokens")[1])
        if report.pending_prompt_tokens > 0:
            return Workload(model, "prefill", batch=1, context_tokens=min(report.pending_prompt_tokens, max_context),
                            sm_pct=job.sm_pct)
        return Workload(model, "decode", batch=min(report.running, max_batch),
                        context_tokens=min(DEFAULT_CONTEXT_TOKENS, max_context), sm_pct=job.sm_pct)

    def activity(index: int, jobs: Sequence[tuple[JobOnGpu, ServerReport | None]]) -> None:
        # A prolog between the controller's read of the state and this call may have added a job that is
        # missing here: only the simulated power is off, until the next tick (attribution splits the counter
        # by SM share, whatever the workloads).
        workloads = [w for job, report in jobs if (w := workload(job, report)) is not None]
        backend.set_workloads(index, workloads)

    return activity


def build_agent(inv: Invocation) -> NodeAgent:
    """The agent with the backends the config (or FESTINA_GPU_BACKEND) asks for."""
    return build_node(inv)[0]


def build_node(inv: Invocation, with_controller: bool = False) -> tuple[NodeAgent, LocalController | None]:
    """The agent, and (``with_controller``, and a ``control_policy`` configured) its local controller."""
    from festina_hpc.config import default_profiles_dir
    from festina_hpc.gpu.factory import resolve_backend_name
    from festina_hpc.gpu.mps import NvidiaMps
    from festina_hpc.gpu.nvml import NvmlBackend
    from festina_hpc.node.simulated import PersistentSimulatedGpu, PersistentSimulatedMps
    from festina_hpc.profiles.store import ProfileStore
    from festina_hpc.slurm.cli_backend import CliSlurmClient

    cfg = inv.config
    paths = NodePaths.of(cfg, inv.node)
    name = resolve_backend_name(_gpu_config(cfg), inv.backend_override)
    store = ProfileStore(Path(cfg.profiles_dir) if cfg.profiles_dir else default_profiles_dir())
    backend: GpuBackend | None = None
    mps: MpsControl | None = None
    jobs_changed: JobsChanged | None = None
    activity: GpuActivity | None = None
    gpu_type = cfg.simulated_type
    if name in ("nvml", "auto"):
        try:
            nvml = NvmlBackend()
            if nvml.device_count() > 0:
                backend, mps = nvml, NvidiaMps(executable=cfg.mps_control)
                try:
                    gpu_type = store.gpu(nvml.info(0).name).name
                except FestinaError:
                    pass
            elif name == "nvml":
                raise NodeError("NVML reports no GPU on this node")
        except GpuError:
            if name == "nvml":
                raise
    if backend is None or mps is None:
        sim = PersistentSimulatedGpu(paths.simulated_file, store, cfg.simulated_type, cfg.simulated_count)
        backend, mps = sim, PersistentSimulatedMps(paths.node_dir / "simulated-mps.json", cfg.simulated_count)
        jobs_changed = _simulated_workloads(sim, store, cfg.default_model)
        activity = _simulated_activity(sim, store, cfg.simulated_type, cfg.default_model)
    slurm_conf = cfg.slurm_conf or inv.env.get("SLURM_CONF", "")
    slurm = CliSlurmClient(Path(slurm_conf) if slurm_conf else None, timeout_s=20.0)
    sink: EnergySink | None = None
    decisions: DecisionSink | None = None
    if cfg.db_url:
        from festina_hpc.db.engine import make_engine
        from festina_hpc.db.store import Store
        from festina_hpc.node.db_sink import DbEnergySink

        sink = decisions = DbEnergySink(Store(make_engine(cfg.db_url)), gpu_type, backend.device_count())
    from festina_hpc.node.control import JobSecrets

    agent = NodeAgent(inv.node, backend, mps, StateFile(paths.state_file, paths.lock_file), paths, sink=sink,
                      slurm=slurm, jobs_changed=jobs_changed, clock_min_interval_s=cfg.clock_min_interval_s,
                      live_share_change=cfg.live_share_change, job_secrets=JobSecrets(cfg.secret_dir))
    if not with_controller or not cfg.control_policy:
        return agent, None
    return agent, build_controller(cfg, store, gpu_type, decisions, activity)


def build_controller(cfg: NodeConfig, store: Any, gpu_type: str, decisions: DecisionSink | None,
                     activity: GpuActivity | None = None) -> LocalController:
    """The local controller: the configured policy over the profiles, model servers over HTTP."""
    from festina_hpc.cluster.slo import default_slo
    from festina_hpc.node.control import HttpModelServers, JobSecrets
    from festina_hpc.policy.base import PolicyContext, make_policy

    gpu = store.gpu(gpu_type).name
    policy = make_policy(cfg.control_policy, PolicyContext(store, gpu, live_share_change=cfg.live_share_change))

    def slo_for(model: str) -> Slo:
        return default_slo(store, gpu, model, cfg.ttft_slo_multiplier, cfg.tbt_slo_multiplier)

    return LocalController(policy, store, gpu, HttpModelServers(cfg.server_timeout_s), slo_for=slo_for,
                           decisions=decisions, activity=activity, secret_of=JobSecrets(cfg.secret_dir))


def _gpu_config(cfg: NodeConfig) -> Any:
    from festina_hpc.config import GpuConfig

    return GpuConfig(backend=cfg.gpu_backend, simulated_type=cfg.simulated_type,
                     simulated_count=cfg.simulated_count, live_share_change=cfg.live_share_change)


def _drain(inv: Invocation, reason: str) -> None:
    from festina_hpc.slurm.cli_backend import CliSlurmClient

    slurm_conf = inv.config.slurm_conf or inv.env.get("SLURM_CONF", "")
    client = CliSlurmClient(Path(slurm_conf) if slurm_conf else None, timeout_s=20.0)
    # Slurm shows this reason (sinfo -R); one printable line.
    client.drain(inv.node, " ".join(reason.split())[:250])


def run_hook(inv: Invocation, hook: str, out: Any = None, *, build: Callable[[Invocation], NodeAgent] | None = None,
             drain: Callable[[Invocation, str], None] | None = None) -> int:
    """One hook, failing open: always 0. ``out`` receives the task prolog's export lines."""
    build = build or build_agent
    drain = drain or _drain
    try:
        ctx = job_context(inv.env)
    except NodeInputError as exc:
        logger.error("%s: nothing done (fail open, node stays up): %s", hook, exc)
        return 0
    except Exception as exc:  # noqa: BLE001 - a value the parser did not foresee is still bad input: one line
        logger.error("%s: nothing done (fail open, node stays up): hook environment unreadable: %s: %s", hook,
                     type(exc).__name__, exc)
        return 0
    # The run's one line of what the job is, every value validated (the scripts log no raw values).
    logger.info("%s job=%d node=%s gpus=%s mps=%s", hook, ctx.job_id, ctx.node, ",".join(map(str, ctx.gpus)),
                "" if ctx.mps_pct is None else ctx.mps_pct)
    try:
        if not ctx.gpus:
            logger.info("%s job %d: no GPUs; nothing to do", hook, ctx.job_id)
            return 0
        inv = Invocation(inv.config, ctx.node, inv.env, inv.backend_override)
        if hook == "task-prolog":
            # Runs as the job's user: only paths, no backend and no state.
            refusal = task_prolog_refusal(ctx)
            if refusal:
                logger.warning("task-prolog job %d: no MPS variables exported: %s", ctx.job_id, refusal)
            for line in task_prolog_lines(ctx, NodePaths.of(inv.config, ctx.node)):
                print(line, file=out or sys.stdout)
            return 0
        agent = build(inv)
        if hook == "prolog":
            agent.prolog(ctx)
            logger.info("prolog job %d: GPUs %s ready (mps %s, clock %s)", ctx.job_id, ctx.gpus, ctx.mps_pct,
                        ctx.directives.clock_mhz)
        else:
            record = agent.epilog(ctx)
            if record is not None:
                logger.info("epilog job %d: %.1f J on GPUs %s", ctx.job_id, record.energy_j, ctx.gpus)
    except GpuLostError as exc:
        logger.error("%s: GPU unusable, draining %s: %s", hook, inv.node, exc)
        try:
            drain(inv, f"festina: {exc}")
        except FestinaError as drain_exc:
            logger.error("%s: drain of %s failed: %s", hook, inv.node, drain_exc)
    except FestinaError as exc:
        logger.error("%s failed (fail open, node stays up): %s", hook, exc)
    except Exception:  # noqa: BLE001 - fail open: a bug in festina must not drain a node either
        logger.exception("%s failed unexpectedly (fail open, node stays up)", hook)
    return 0


def _allowed_uids(service_user: str, what: str = "the control socket") -> frozenset[int]:
    uids = {0}
    try:
        uids.add(pwd.getpwnam(service_user).pw_uid)
    except KeyError:
        logger.warning("user %r does not exist; only root may use %s", service_user, what)
    return frozenset(uids)


def build_network_server(inv: Invocation, agent: NodeAgent) -> Any:
    """festinad's signed channel (``[node] control_port``), or None when off; a bad secret file stops the start."""
    from festina_hpc.node.auth import Munge, Verifier, load_secret
    from festina_hpc.node.service import NetworkControlServer

    cfg = inv.config
    if not cfg.control_port:
        return None
    key = load_secret(Path(cfg.control_secret_file)) if cfg.control_auth == "secret" else None
    verifier = Verifier(inv.node, cfg.control_auth, key=key, munge=Munge(cfg.munge_socket),
                        allowed_uids=_allowed_uids(cfg.festinad_user, "the network control port"),
                        window_s=cfg.control_window_s)
    try:
        return NetworkControlServer((cfg.control_addr, cfg.control_port), agent, verifier)
    except OSError as exc:
        raise NodeError(f"control port {cfg.control_addr}:{cfg.control_port}: {exc.strerror or exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=f"Node config (default: $FESTINA_NODE_CONFIG, else {CONFIG_NAME} beside $SLURM_CONF).")
@click.option("--node", default=None, help="Node name (default: $SLURMD_NODENAME, else the host name).")
@click.option("-v", "--verbose", count=True,
              help="-v: festina's own lines at DEBUG (default INFO); -vv: other libraries' INFO too.")
@click.option("--syslog", is_flag=True,
              help="Log to syslog (/dev/log) instead of stderr: the task prolog runs as the job's user, who may "
                   "not write the hook log.")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, node: str | None, verbose: int, syslog: bool) -> None:
    """festina-node: Slurm hooks, the root-owned GPU control service and energy accounting of a GPU node."""
    env = dict(os.environ)
    # The hook log gets festina's lines, not the libraries' INFO (the migration tool's plugin setup, SQL).
    configure_logging(verbose, quiet_level=logging.INFO, handlers=[log_handler(SYSLOG_SOCKET if syslog else None)])
    config = load_node_config(find_config(config_path, env))
    name = node or env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    ctx.obj = Invocation(config, name, env, env.get("FESTINA_GPU_BACKEND") or None)


def _hook_command(hook: str) -> click.Command:
    @click.pass_obj
    def command(inv: Invocation) -> None:
        sys.exit(run_hook(inv, hook))

    command.__doc__ = f"Slurm {hook.replace('-', ' ')} hook: reads the job from the environment; always exits 0."
    return click.command(hook)(command)


for _hook in ("prolog", "epilog", "task-prolog"):  # see HOOKS
    cli.add_command(_hook_command(_hook))


@cli.command()
@click.option("--once", is_flag=True, help="One control tick, then exit.")
@click.pass_obj
def serve(inv: Invocation, once: bool) -> None:
    """The root-owned service: control socket (root and the service user only), festinad's signed control port
    (if configured) and the control loop."""
    from festina_hpc.node.service import ControlLoop, ControlServer

    agent, controller = build_node(inv, with_controller=True)
    loop = ControlLoop(agent, inv.config.control_period_s, controller)
    if once:
        click.echo(json.dumps({"node": inv.node, **_tick_summary(loop.tick())}))
        return
    paths = NodePaths.of(inv.config, inv.node)
    network = build_network_server(inv, agent)
    server = ControlServer(paths.socket, agent, _allowed_uids(inv.config.service_user))
    stopped = threading.Event()

    def stop(_signum: int, _frame: Any) -> None:
        stopped.set()
        threading.Thread(target=server.shutdown, daemon=True).start()
        if network is not None:
            threading.Thread(target=network.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop.start()
    outputs = _start_outputs(inv, agent)
    if network is not None:
        threading.Thread(target=network.serve_forever, kwargs={"poll_interval": 0.2}, name="festina-node-network",
                         daemon=True).start()
        logger.info("festina-node %s: festinad's control on %s:%d (%s)", inv.node, inv.config.control_addr,
                    inv.config.control_port, inv.config.control_auth)
    logger.info("festina-node %s: serving on %s, control every %g s (policy %s)", inv.node, paths.socket,
                inv.config.control_period_s, inv.config.control_policy or "none: settings only on request")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if network is not None:
            network.server_close()
        outputs.stop()
        loop.stop()
        server.server_close()
        paths.socket.unlink(missing_ok=True)


def _start_outputs(inv: Invocation, agent: NodeAgent) -> Any:
    """The metrics port and the AdminComment writer (festina_hpc.node.metrics), as the config asks."""
    from festina_hpc.node.metrics import start_node_outputs
    from festina_hpc.slurm.cli_backend import CliSlurmClient

    cfg = inv.config
    slurm_conf = cfg.slurm_conf or inv.env.get("SLURM_CONF", "")
    return start_node_outputs(inv.node, agent.status, metrics_port=cfg.metrics_port, metrics_addr=cfg.metrics_addr,
                              comment_period_s=cfg.admin_comment_period_s,
                              client=CliSlurmClient(Path(slurm_conf) if slurm_conf else None, timeout_s=20.0))


def _tick_summary(report: TickReport) -> dict[str, Any]:
    return {"mps_restarted": list(report.mps_restarted), "requeued": list(report.requeued),
            "clock_changes": dict(report.clock_changes), "share_changes": dict(report.share_changes)}


@cli.command()
@click.pass_obj
def status(inv: Invocation) -> None:
    """The node's recorded state as JSON (jobs per GPU, energy ledger, clocks, MPS)."""
    paths = NodePaths.of(inv.config, inv.node)
    click.echo(json.dumps({"node": inv.node, **as_plain(StateFile(paths.state_file, paths.lock_file).read())},
                          indent=1))


@cli.command()
@click.pass_obj
def reset(inv: Invocation) -> None:
    """Operator clean-up: default clocks on every GPU and every MPS daemon festina started stopped."""
    build_agent(inv).reset_all()
    click.echo(f"festina-node {inv.node}: GPUs reset")


@cli.command("request")
@click.argument("op")
@click.argument("args_json", default="{}")
@click.pass_obj
def request_cmd(inv: Invocation, op: str, args_json: str) -> None:
    """Call the node service: OP with a JSON object of arguments, e.g. lock_clocks '{"gpu": 0, "clock_mhz": 1410}'."""
    from festina_hpc.node.service import request

    try:
        args = json.loads(args_json)
    except ValueError as exc:
        raise NodeError(f"arguments {args_json[:80]!r} are not JSON: {exc}") from None
    result = request(NodePaths.of(inv.config, inv.node).socket, op, args)
    click.echo(json.dumps(result, indent=1))


HOOKS = ("prolog", "epilog", "task-prolog")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="festina-node", standalone_mode=False)
    except FestinaError as exc:
        # One line in the hook log: a config path may come from the job's environment (the task prolog's).
        click.echo(f"festina-node: error: {escape_controls(str(exc))}", err=True)
        # A hook fails open even when festina-node cannot start (a bad config file).
        return 0 if any(a in HOOKS for a in args) else 2
    except click.UsageError as exc:
        click.echo(f"festina-node: error: {exc.format_message()}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
