"""A real Slurm cluster on loopback for development and tests: munge, slurmctld and N slurmd, all under one folder.

Follows the verified recipe in ``notes/slurm-local-cluster.md`` (Slurm 22.05,
root, no systemd): one ``NodeName=n[1-N]`` line on 127.0.0.1 with a port per
node, fake GPUs as character devices (``mknod``) so ``gres/gpu`` and
``gres/mps`` schedule, power saving through the project's
``slurm_plugins/suspend`` and ``resume`` (which record each node's power
state in ``<base>/power/<node>``), and the project's prolog/epilog/task_prolog.
On each node ``festina-node serve`` runs too (simulated GPUs; named n1..nN as
Slurm names the nodes; its signed control port ``node_port + i - 1``; its
state under ``<base>/node/<node>``), so the cluster has a node controller,
energy attribution and AdminComments without anyone starting them by hand.
festinad and every festina-node write one database (``database_url``: by
default ``sqlite:///<base>/festina.db``, which SQLite shares safely between
processes because festina's writers begin IMMEDIATE in WAL mode, see
``festina_hpc/db/engine.py``; or a PostgreSQL URL). ``up`` prints it.
Everything lives under the base folder, ports are configurable, and the
daemons are stopped by the PIDs in their pid files, so two clusters can run
side by side. Starting one takes a few seconds once the packages are there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from festina_hpc.errors import FestinaError
from festina_hpc.slurm.cli_backend import CliSlurmClient
from festina_hpc.slurm.errors import SlurmError

DEFAULT_BASE_DIR = Path("/srv/festina-dev")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
STATE_FILE = "cluster.json"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
_NVIDIA_MAJOR = 195  # the real driver's char-device major; slurmd only checks that the file is a device
_STOP_GRACE_S = 10.0


class DevClusterError(FestinaError):
    """The dev cluster could not be installed, started, stopped or read."""


def default_plugins_dir() -> Path:
    """The project's ``slurm_plugins``: next to the package in a checkout, else where pip put the data files."""
    checkout = Path(__file__).resolve().parent.parent / "slurm_plugins"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "festina-hpc" / "slurm_plugins"


@dataclass(frozen=True)
class DevClusterConfig:
    base_dir: Path = DEFAULT_BASE_DIR
    nodes: int = 4
    gpus_per_node: int = 2
    gpu_type: str = "h100"
    cpus_per_node: int = 8
    memory_mb: int = 16000
    ctld_port: int = 26817  # away from Slurm's 6817 and the notes' 16817, so those can run beside
    slurmd_port: int = 27001  # node i listens on slurmd_port + i - 1
    # Power saving: the last ``power_save_nodes`` nodes are powered down after ``suspend_time_s`` idle; the others
    # are SuspendExcNodes so jobs of tests never wait for a node to boot. Pass nodes to make every node eligible.
    suspend_time_s: int = 10
    suspend_timeout_s: int = 3
    resume_timeout_s: int = 30
    power_save_nodes: int = 1
    cluster_name: str = "festina-dev"
    partition: str = "gpu"
    plugins_dir: Path = field(default_factory=default_plugins_dir)
    # festina-node serve on every node, its signed control channel on node_port + i - 1 (127.0.0.1).
    festina_node: bool = True
    node_port: int = 28001
    db_url: str = ""  # the database festinad and the nodes share; "" = sqlite:///<base_dir>/festina.db

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 64:
            raise DevClusterError(f"nodes = {self.nodes} must be in 1..64")
        if not 1 <= self.gpus_per_node <= 8:
            raise DevClusterError(f"gpus_per_node = {self.gpus_per_node} must be in 1..8")
        if not 0 <= self.power_save_nodes <= self.nodes:
            raise DevClusterError(f"power_save_nodes = {self.power_save_nodes} must be in 0..{self.nodes}")
        for name in ("ctld_port", "slurmd_port", "node_port"):
            port = getattr(self, name)
            if not 1024 <= port <= 65535 - self.nodes:
                raise DevClusterError(f"{name} = {port} must be in 1024..{65535 - self.nodes}")
        if self.ctld_port in range(self.slurmd_port, self.slurmd_port + self.nodes):
            raise DevClusterError(f"ctld_port {self.ctld_port} falls in the slurmd ports")
        if self.festina_node:
            node_ports = range(self.node_port, self.node_port + self.nodes)
            if self.ctld_port in node_ports or set(node_ports) & set(range(self.slurmd_port,
                                                                          self.slurmd_port + self.nodes)):
                raise DevClusterError(f"node_port {self.node_port}: the festina-node ports overlap Slurm's")
        if not self.base_dir.is_absolute():
            raise DevClusterError(f"base dir {self.base_dir} must be absolute (it goes into slurm.conf)")

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(f"n{i}" for i in range(1, self.nodes + 1))

    @property
    def power_save_node_names(self) -> tuple[str, ...]:
        return self.node_names[self.nodes - self.power_save_nodes:]

    @property
    def slurm_conf(self) -> Path:
        return self.base_dir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base_dir / "munge" / "munge.socket"

    @property
    def database_url(self) -> str:
        """The one database festinad and every festina-node write."""
        return self.db_url or f"sqlite:///{self.base_dir / 'festina.db'}"

    def node_control_port(self, node: str) -> int:
        """Where festina-node of ``node`` (n1..nN) takes festinad's signed requests."""
        return self.node_port + self.node_names.index(node)

    def node_config_path(self, node: str) -> Path:
        """festina-node serve's own config for ``node`` (the hooks read ``festina-node.toml``)."""
        return self.base_dir / "etc" / f"festina-node-{node}.toml"

    def to_json(self) -> str:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DevClusterConfig:
        data = json.loads(text)
        for key in ("base_dir", "plugins_dir"):
            data[key] = Path(data[key])
        return cls(**data)


def _hostlist(names: Sequence[str]) -> str:
    return ",".join(names)


def render_slurm_conf(cfg: DevClusterConfig) -> str:
    """slurm.conf for ``cfg``; every path absolute (slurmctld runs hooks from its log folder)."""
    b, p = cfg.base_dir, cfg.plugins_dir
    last = cfg.nodes
    excluded = cfg.node_names[:cfg.nodes - cfg.power_save_nodes]
    lines = [
        "# Generated by `festina dev-cluster up`; rewritten on every start.",
        f"ClusterName={cfg.cluster_name}",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={cfg.ctld_port}",
        f"SlurmdPort={cfg.slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also sets how long a requeued job waits before it is eligible (default 120 s).
        f"AuthInfo=socket={cfg.munge_socket},cred_expire=10",
        f"StateSaveLocation={b}/state",
        f"SlurmdSpoolDir={b}/spool/%n",
        f"SlurmctldPidFile={b}/run/slurmctld.pid",
        f"SlurmdPidFile={b}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={b}/log/slurmctld.log",
        f"SlurmdLogFile={b}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "MpiDefault=none",
        "ReturnToService=2",
        # Nodes claim more CPUs than the machine has.
        "SlurmdParameters=config_overrides",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=300",
        # Never mps and shard together: that loses CUDA_VISIBLE_DEVICES and GPU/MPS exclusivity.
        "GresTypes=gpu,mps",
        f"Prolog={p}/prolog",
        f"Epilog={p}/epilog",
        f"TaskProlog={p}/task_prolog",
        # Power saving. SuspendTime must not be INFINITE, else POWER_DOWN is refused and nothing is suspended.
        f"SuspendProgram={p}/suspend",
        f"ResumeProgram={p}/resume",
        f"SuspendTime={cfg.suspend_time_s}",
        f"SuspendTimeout={cfg.suspend_timeout_s}",
        f"ResumeTimeout={cfg.resume_timeout_s}",
        "SuspendRate=0",
        "ResumeRate=0",
        "DebugFlags=Power",
        # The power-save thread looks at nodes every 10 s by default; 1 s keeps suspend and resume prompt.
        "SlurmctldParameters=power_save_interval=1,power_save_min_interval=0",
    ]
    if excluded:
        lines.append(f"SuspendExcNodes={_hostlist(excluded)}")
    lines += [
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"NodeName=n[1-{last}] NodeHostname=localhost NodeAddr=127.0.0.1 "
        f"Port={cfg.slurmd_port}-{cfg.slurmd_port + last - 1} CPUs={cfg.cpus_per_node} Boards=1 SocketsPerBoard=1 "
        f"CoresPerSocket={cfg.cpus_per_node} ThreadsPerCore=1 RealMemory={cfg.memory_mb} "
        f"Gres=gpu:{cfg.gpu_type}:{cfg.gpus_per_node},mps:{100 * cfg.gpus_per_node} State=UNKNOWN",
        # DefMemPerCPU: without it every job takes the node's whole RealMemory and GPU jobs run one at a time.
        f"PartitionName={cfg.partition} Nodes=n[1-{last}] Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000",
    ]
    if cfg.nodes == 1:
        lines = [line.replace("n[1-1]", "n1") for line in lines]
    return "\n".join(lines) + "\n"


def render_gres_conf(cfg: DevClusterConfig) -> str:
    """gres.conf: GPUs need File= (file-less GPUs are dropped and the node goes INVAL); mps is 100 per GPU."""
    files = f"{cfg.base_dir}/dev/nvidia[0-{cfg.gpus_per_node - 1}]" if cfg.gpus_per_node > 1 \
        else f"{cfg.base_dir}/dev/nvidia0"
    return (f"AutoDetect=off\nName=gpu Type={cfg.gpu_type} File={files}\n"
            f"Name=mps Count={100 * cfg.gpus_per_node} File={files}\n")


# -- processes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Daemon:
    name: str  # "munged", "slurmctld", "slurmd n1"
    comm: str  # /proc/PID/comm of the process, checked before any signal so a reused PID is left alone
    pid_file: Path


@dataclass(frozen=True)
class DaemonStatus:
    name: str
    pid: int | None  # from the pid file, None when there is none
    running: bool


@dataclass(frozen=True)
class DevClusterStatus:
    config: DevClusterConfig | None  # None when the base dir holds no cluster
    daemons: tuple[DaemonStatus, ...]
    power: tuple[tuple[str, str], ...]  # (node, last state the suspend/resume scripts recorded)

    @property
    def running(self) -> bool:
        """munged and slurmctld run (slurmds of powered-down nodes are stopped on purpose)."""
        return any(self.daemons) and all(d.running for d in self.daemons
                                         if d.name in ("munged", "slurmctld"))


NODE_COMM = "festina-node"  # /proc/PID/comm of the festina-node script


def daemons(cfg: DevClusterConfig) -> tuple[Daemon, ...]:
    run = cfg.base_dir / "run"
    nodes = tuple(Daemon(f"festina-node {n}", NODE_COMM, run / f"festina-node-{n}.pid")
                  for n in cfg.node_names) if cfg.festina_node else ()
    return (Daemon("munged", "munged", run / "munged.pid"),
            Daemon("slurmctld", "slurmctld", run / "slurmctld.pid"),
            *(Daemon(f"slurmd {n}", "slurmd", run / f"slurmd-{n}.pid") for n in cfg.node_names),
            *nodes)


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int, comm: str) -> bool:
    """True when ``pid`` runs ``comm`` and is not a zombie (PID 1 here reaps late, and kill -0 is true for zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        actual = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return actual == comm and state not in ("Z", "X")


def daemon_status(daemon: Daemon) -> DaemonStatus:
    pid = _read_pid(daemon.pid_file)
    return DaemonStatus(daemon.name, pid, pid is not None and _alive(pid, daemon.comm))


def load_config(base_dir: Path) -> DevClusterConfig | None:
    path = base_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return DevClusterConfig.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise DevClusterError(f"{path}: not a dev cluster description ({exc})") from exc


def base_dir_of(slurm_conf: Path) -> Path:
    """The base dir of the dev cluster whose slurm.conf is ``slurm_conf`` (``<base>/etc/slurm.conf``)."""
    return slurm_conf.resolve().parent.parent


def status(base_dir: Path = DEFAULT_BASE_DIR) -> DevClusterStatus:
    cfg = load_config(base_dir)
    if cfg is None:
        return DevClusterStatus(None, (), ())
    power = []
    for node in cfg.node_names:
        try:
            power.append((node, (base_dir / "power" / node).read_text().strip()))
        except OSError:
            power.append((node, "unknown"))
    return DevClusterStatus(cfg, tuple(daemon_status(d) for d in daemons(cfg)), tuple(power))


def missing_binaries() -> tuple[str, ...]:
    return tuple(b for b in REQUIRED_BINARIES if shutil.which(b, path=_PATH) is None)


# -- install, up, down -------------------------------------------------------------------------------------------

def _run(argv: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 60.0) -> None:
    try:
        proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevClusterError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise DevClusterError(f"{' '.join(argv)}: exit code {proc.returncode}: {detail}")


def _say_on_stderr(text: str) -> None:
    print(f"festina dev-cluster: {text}", file=sys.stderr, flush=True)


def install_packages(run: Callable[..., None] = _run, policy_rc_d: Path = _POLICY_RC_D,
                     progress: Callable[[str], None] = _say_on_stderr) -> None:
    """apt-get install the Slurm and munge packages, keeping their postinst from starting services.

    ``progress`` hears each step before it starts (by default on stderr): apt-get runs minutes
    with its output captured, and a silent command that long looks hung.
    """
    if os.geteuid() != 0:
        raise DevClusterError("installing packages needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": _PATH}
    # policy-rc.d exit 101 = "action forbidden": the packages would otherwise start a system-wide
    # slurmctld/munged on the default ports. Only remove it if we wrote it.
    created = not policy_rc_d.exists()
    if created:
        policy_rc_d.write_text("#!/bin/sh\n# festina dev-cluster: no service starts during install\nexit 101\n")
        policy_rc_d.chmod(0o755)
    try:
        progress("installing: apt-get update (package lists; up to 5 minutes)")
        run(["apt-get", "update", "-q"], env=env, timeout_s=300.0)
        progress(f"installing: apt-get install {' '.join(PACKAGES)} (up to 10 minutes)")
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env, timeout_s=600.0)
        progress("installed " + " ".join(PACKAGES))
    finally:
        if created:
            policy_rc_d.unlink(missing_ok=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int = 30000, stop: int = 60000) -> int:
    """The first port p >= start with p..p+count-1 all free (for a second cluster beside the default one)."""
    port = start
    while port + count < stop:
        if all(_port_free(port + i) for i in range(count)):
            return port
        port += count
    raise DevClusterError(f"no {count} consecutive free ports in {start}..{stop}")


def _prepare_base_dir(cfg: DevClusterConfig) -> None:
    b = cfg.base_dir
    if b.exists() and any(b.iterdir()) and not (b / STATE_FILE).exists():
        raise DevClusterError(f"{b} is not empty and holds no dev cluster; choose another --base-dir")
    # A fresh cluster every time: old state would bring back old jobs and drained nodes.
    for sub in ("state", "spool", "power", "run", "node"):
        shutil.rmtree(b / sub, ignore_errors=True)
    (b / "festina.db").unlink(missing_ok=True)
    for sub in ("etc", "state", "log", "run", "power", "dev", "out", "munge"):
        (b / sub).mkdir(parents=True, exist_ok=True)
    for node in cfg.node_names:
        (b / "spool" / node).mkdir(parents=True, exist_ok=True)
        (b / "power" / node).write_text("on\n")
    (b / "munge").chmod(0o711)  # 700 makes munged warn that the socket is inaccessible
    for i in range(cfg.gpus_per_node):
        dev = b / "dev" / f"nvidia{i}"
        if not dev.is_char_device():
            dev.unlink(missing_ok=True)
            os.mknod(dev, 0o666 | 0o020000, os.makedev(_NVIDIA_MAJOR, i))
    (b / "etc" / "slurm.conf").write_text(render_slurm_conf(cfg))
    (b / "etc" / "gres.conf").write_text(render_gres_conf(cfg))
    _write_node_files(cfg)
    (b / STATE_FILE).write_text(cfg.to_json())


def festina_node_executable() -> Path | None:
    """The ``festina-node`` of this interpreter's environment (a venv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "festina-node"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("festina-node")
    return Path(found).resolve() if found else None


def render_node_config(cfg: DevClusterConfig, node: str | None = None) -> str:
    """festina-node.toml beside slurm.conf (the hooks'): simulated GPUs, state per node under the base dir, the
    cluster's database. With ``node``: that node's serve config, the same plus its own signed control port."""
    b = cfg.base_dir
    text = ("# Generated by `festina dev-cluster up`: festina-node on simulated GPUs.\n[node]\n"
            f'state_dir = "{b}/node"\ngpu_backend = "simulated"\nsimulated_count = {cfg.gpus_per_node}\n'
            f"db_url = {json.dumps(cfg.database_url)}\n"
            f'slurm_conf = "{cfg.slurm_conf}"\nmunge_socket = "{cfg.munge_socket}"\n'
            # Everything on the dev cluster runs as root (festinad too); a site's nodes name festinad's user.
            'service_user = "root"\nfestinad_user = "root"\n')
    if node is None:
        return text
    # The hooks and the service share state_dir (per node below it) and the database; only the port is the node's.
    return text + (f'control_port = {cfg.node_control_port(node)}\ncontrol_addr = "127.0.0.1"\n'
                   'control_auth = "munge"\n')


def _write_node_files(cfg: DevClusterConfig) -> None:
    """What the hooks need to call festina-node: its absolute path (hooks get no PATH) and its config."""
    etc = cfg.base_dir / "etc"
    executable = festina_node_executable()
    if executable is not None:
        (etc / "festina-node.path").write_text(f"{executable}\n")
    (etc / "festina-node.toml").write_text(render_node_config(cfg))
    for node in cfg.node_names:
        cfg.node_config_path(node).write_text(render_node_config(cfg, node))
    (cfg.base_dir / "node").mkdir(exist_ok=True)
    from festina_hpc.db.engine import make_engine
    from festina_hpc.db.migrate import upgrade

    engine = make_engine(cfg.database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def _start_munge(cfg: DevClusterConfig, env: dict[str, str]) -> None:
    m = cfg.base_dir / "munge"
    key = m / "munge.key"
    if not key.exists():
        _run(["mungekey", "-c", "-k", str(key), "-b", "1024"], env)
        key.chmod(0o600)
    # --force: munged refuses to run as root otherwise.
    _run(["munged", "--force", "-S", str(cfg.munge_socket), f"--key-file={key}",
          f"--pid-file={cfg.base_dir / 'run' / 'munged.pid'}", f"--log-file={cfg.base_dir / 'log' / 'munged.log'}",
          f"--seed-file={m / 'munged.seed'}"], env)


def _wait_idle(cfg: DevClusterConfig, timeout_s: float) -> None:
    client = CliSlurmClient(cfg.slurm_conf, timeout_s=10.0)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            nodes = {n.name: n for n in client.list_nodes()}
            bad = [f"{name}={nodes[name].state}{'+' if nodes[name].flags else ''}{'+'.join(nodes[name].flags)}"
                   if name in nodes else f"{name}=missing" for name in cfg.node_names
                   if name not in nodes or nodes[name].state != "idle" or nodes[name].flags]
            if not bad:
                return
            last = ", ".join(bad)
        except SlurmError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise DevClusterError(f"nodes not idle {timeout_s:g} s after start ({last}); "
                                  f"see {cfg.base_dir / 'log'}")
        time.sleep(0.2)


def up(cfg: DevClusterConfig, *, install: bool = False, wait_s: float = 30.0) -> DevClusterStatus:
    """Start the cluster (a fresh one) and wait until every node is idle."""
    if os.geteuid() != 0:
        raise DevClusterError("the dev cluster runs slurmd as root: run as root")
    if install and missing_binaries():
        install_packages()
    missing = missing_binaries()
    if missing:
        raise DevClusterError(f"missing {', '.join(missing)}: install {' '.join(PACKAGES)} (or pass --install)")
    current = status(cfg.base_dir)
    if any(d.running for d in current.daemons):
        raise DevClusterError(f"a dev cluster already runs in {cfg.base_dir}; run `festina dev-cluster down` first")
    node_ports = range(cfg.node_port, cfg.node_port + cfg.nodes) if cfg.festina_node else range(0)
    for port in (cfg.ctld_port, *range(cfg.slurmd_port, cfg.slurmd_port + cfg.nodes), *node_ports):
        if not _port_free(port):
            raise DevClusterError(f"port {port} on 127.0.0.1 is in use; choose --ctld-port/--slurmd-port/--node-port")
    if cfg.festina_node and festina_node_executable() is None:
        raise DevClusterError("festina-node is not installed beside this festina nor on PATH "
                              "(pip install festina-hpc there, or pass --no-festina-node)")
    for script in ("prolog", "epilog", "task_prolog", "suspend", "resume"):
        if not os.access(cfg.plugins_dir / script, os.X_OK):
            raise DevClusterError(f"{cfg.plugins_dir / script} is missing or not executable")
    _prepare_base_dir(cfg)
    env = {**os.environ, "PATH": _PATH, "SLURM_CONF": str(cfg.slurm_conf)}
    try:
        _start_munge(cfg, env)
        _run(["slurmctld", "-i"], env)  # -i: no state files on a fresh start is fine
        for node in cfg.node_names:
            _run(["slurmd", "-N", node], env)
        _wait_idle(cfg, wait_s)
        if cfg.festina_node:
            _start_festina_nodes(cfg, env, wait_s)
    except DevClusterError:
        down(cfg.base_dir)
        raise
    return status(cfg.base_dir)


def _start_festina_nodes(cfg: DevClusterConfig, env: dict[str, str], timeout_s: float) -> None:
    """``festina-node serve`` per node, in its own session (it outlives ``festina dev-cluster up``), its log in
    ``<base>/log/festina-node-<node>.log``; waits until each listens on its control socket and port."""
    from festina_hpc.node.config import NodePaths, load_node_config

    executable = festina_node_executable()
    assert executable is not None  # checked by up()
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    for node in cfg.node_names:
        log_path = cfg.base_dir / "log" / f"festina-node-{node}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([str(executable), "--config", str(cfg.node_config_path(node)), "--node", node,
                                     "serve"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        (cfg.base_dir / "run" / f"festina-node-{node}.pid").write_text(f"{proc.pid}\n")
        started.append((node, proc, log_path))
    deadline = time.monotonic() + timeout_s
    for node, proc, log_path in started:
        socket_path = NodePaths.of(load_node_config(cfg.node_config_path(node)), node).socket
        while not (socket_path.is_socket() and not _port_free(cfg.node_control_port(node))):
            if proc.poll() is not None or time.monotonic() >= deadline:
                tail = " ".join(log_path.read_text(errors="replace").split()[-40:])
                why = f"exited with {proc.returncode}" if proc.returncode is not None else \
                    f"not listening {timeout_s:g} s after start"
                raise DevClusterError(f"festina-node {node} {why}: {tail}")
            time.sleep(0.1)


def _wait_jobs_gone(cfg: DevClusterConfig, timeout_s: float) -> None:
    """Wait until no job holds a node: a slurmd stopped before it passed the kill on leaves slurmstepd behind."""
    client = CliSlurmClient(cfg.slurm_conf, timeout_s=5.0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not any(j.state in ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED") for j in client.list_jobs()):
                return
        except SlurmError:
            return
        time.sleep(0.1)


def _signal_all(pids: Sequence[tuple[int, str]], sig: signal.Signals) -> None:
    for pid, comm in pids:
        if _alive(pid, comm):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _stop(procs: Sequence[tuple[int, str]], grace_s: float) -> None:
    """SIGTERM together, wait, SIGKILL what is left (stopping them one by one took ~3 s per slurmd)."""
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid, comm) for pid, comm in procs):
        if time.monotonic() >= deadline:
            _signal_all(procs, signal.SIGKILL)
            break
        time.sleep(0.05)


def down(base_dir: Path = DEFAULT_BASE_DIR, grace_s: float = _STOP_GRACE_S) -> tuple[str, ...]:
    """Cancel every job, then stop festina-node, slurmds and slurmctld, then munged; by PID, never by name. The
    names stopped."""
    cfg = load_config(base_dir)
    if cfg is None:
        return ()
    found = {d.name: (daemon_status(d), d.comm) for d in daemons(cfg)}
    running: dict[str, tuple[int, str]] = {}
    for name, (st, comm) in found.items():
        if st.running and st.pid is not None:
            running[name] = (st.pid, comm)
    if "slurmctld" in running and "munged" in running:
        # Otherwise slurmstepd and the jobs' processes outlive their slurmd.
        env = {**os.environ, "PATH": _PATH, "SLURM_CONF": str(cfg.slurm_conf)}
        try:
            _run(["scancel", f"--partition={cfg.partition}"], env, timeout_s=10.0)
            _wait_jobs_gone(cfg, grace_s)
        except DevClusterError:
            pass
    # festina-node and Slurm's daemons together; munged last (both sign with it until they stop).
    slurm = [pid_comm for name, pid_comm in running.items() if name != "munged"]
    _stop(slurm, grace_s)
    for node in cfg.node_names:
        (base_dir / "run" / f"festina-node-{node}.pid").unlink(missing_ok=True)
    if "munged" in running:
        _stop([running["munged"]], grace_s)
    return tuple(running)
