"""festina-node's config file (TOML, one ``[node]`` table) and the per-node paths derived from it.

Found by ``main()``: ``--config``, else ``$FESTINA_NODE_CONFIG``, else
``festina-node.toml`` next to ``slurm.conf`` (the hooks' ``SLURM_CONF``), else
built-in defaults. Every key has a default; an unknown key or a value of the
wrong type is a ``ConfigError`` naming it. Several "nodes" of the dev cluster
share one machine, so every path is per node: ``<state_dir>/<node>/...``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from festina_hpc.cluster.slo import DEFAULT_TBT_MULTIPLIER, DEFAULT_TTFT_MULTIPLIER
from festina_hpc.config import GPU_BACKENDS
from festina_hpc.errors import ConfigError
from festina_hpc.node.auth import SCHEMES

CONFIG_NAME = "festina-node.toml"
# Paths end up in the job environment (TaskProlog "export" lines, which Slurm parses itself): keep them one word.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_.@+/-]*")


@dataclass(frozen=True)
class NodeConfig:
    state_dir: str = "/var/lib/festina-node"  # per node: state.json, its lock, the control socket
    mps_dir: str = ""  # per-GPU MPS pipe and log folders; "" = <state_dir>/<node>/mps
    socket_path: str = ""  # the control socket; "" = <state_dir>/<node>/control.sock
    service_user: str = "festina"  # besides root, the one user the control socket serves
    gpu_backend: str = "auto"  # nvml | simulated | auto; FESTINA_GPU_BACKEND overrides it
    simulated_type: str = "h100-sxm-80gb"
    simulated_count: int = 2
    default_model: str = "llama-3.1-8b"  # what a simulated GPU runs for a job whose comment names no model
    profiles_dir: str = ""  # "" = the shipped profiles
    db_url: str = ""  # where job energy goes; "" = nowhere (logged only)
    mps_control: str = "nvidia-cuda-mps-control"
    control_period_s: float = 2.0  # control loop tick
    clock_min_interval_s: float = 10.0  # a lower clock waits this long after the last clock change
    # The local controller run every tick (festina_hpc.policy names); "" = none: settings change only
    # when asked over the socket (set_settings).
    control_policy: str = "festina"
    ttft_slo_multiplier: float = DEFAULT_TTFT_MULTIPLIER  # the models' SLOs, as festinad's [daemon] defaults
    tbt_slo_multiplier: float = DEFAULT_TBT_MULTIPLIER
    server_timeout_s: float = 1.0  # a model server's /health or /admin/settings answer
    # festinad's [daemon] secret_dir as this node sees it (a shared filesystem): its servers' secret files. The
    # default is festinad's default (<job_output_dir>/secrets, job_output_dir /tmp); "" = none: a server with a
    # secret is then left as it is.
    secret_dir: str = "/tmp/secrets"
    # As [gpu] live_share_change: whether the serving engine changes a running instance's SM share
    # itself. False (MPS: a client's share is fixed when its CUDA context is created): a share the
    # controller wants is recorded as the job's wanted share, for festinad to restart the instance at.
    live_share_change: bool = False
    slurm_conf: str = ""  # "" = $SLURM_CONF of the caller
    metrics_port: int = 0  # Prometheus /metrics of the service (power, energy per GPU and model); 0 = off
    metrics_addr: str = "127.0.0.1"  # where the metrics port listens; "0.0.0.0" lets a remote Prometheus in
    # Running jobs' energy into their Slurm AdminComment this often; 0 = never. Slurm refuses it once a job
    # ended (already in the Epilog), so the last value written while it ran is the one that stays.
    admin_comment_period_s: float = 30.0
    # festinad's channel to this node (festina_hpc/node/auth.py): the control socket's ops over TCP, each message
    # signed. 0 = off. Only festinad_user (by MUNGE credential) or root may send them.
    control_port: int = 0
    control_addr: str = "0.0.0.0"  # the head node must reach it; every message is authenticated
    control_auth: str = "munge"  # munge | secret (HMAC-SHA256 under control_secret_file, where MUNGE is missing)
    control_secret_file: str = ""  # mode 600, owned by root; the same key as festinad's [node_control]
    festinad_user: str = "festina"  # the user festinad runs as: the one non-root MUNGE uid accepted
    control_window_s: float = 30.0  # a message older (or newer) than this is refused; nonces are kept this long
    munge_socket: str = ""  # munged's socket; "" = munge's default (/run/munge/munge.socket.2)


def load_node_config(path: Path | None) -> NodeConfig:
    if path is None:
        return NodeConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"node"})
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}] (known: node)")
    return node_config_from_mapping(raw.get("node", {}), str(path))


def node_config_from_mapping(raw: Any, source: str) -> NodeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [node] must be a table")
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key node.{key} (known: {', '.join(sorted(fields))})")
        expected = type(fields[key].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(f"{source}: node.{key} must be {expected.__name__}, got {value!r}")
        values[key] = value
    cfg = NodeConfig(**values)
    if cfg.gpu_backend not in GPU_BACKENDS:
        raise ConfigError(f"{source}: node.gpu_backend = {cfg.gpu_backend!r} is not one of {', '.join(GPU_BACKENDS)}")
    for key in ("simulated_count", "control_period_s", "ttft_slo_multiplier", "tbt_slo_multiplier",
                "server_timeout_s"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{source}: node.{key} = {getattr(cfg, key)!r} must be positive")
    for key in ("clock_min_interval_s", "admin_comment_period_s"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{source}: node.{key} must not be negative")
    for key in ("metrics_port", "control_port"):
        if not 0 <= getattr(cfg, key) <= 65535:
            raise ConfigError(f"{source}: node.{key} = {getattr(cfg, key)} must be in 0..65535 (0 = off)")
    if cfg.control_auth not in SCHEMES:
        raise ConfigError(f"{source}: node.control_auth = {cfg.control_auth!r} is not one of {', '.join(SCHEMES)}")
    if cfg.control_port and cfg.control_auth == "secret" and not cfg.control_secret_file:
        raise ConfigError(f"{source}: node.control_auth = 'secret' needs node.control_secret_file")
    if cfg.control_window_s <= 0:
        raise ConfigError(f"{source}: node.control_window_s = {cfg.control_window_s!r} must be positive")
    for key in ("state_dir", "mps_dir", "socket_path"):
        value = getattr(cfg, key)
        if value and not _SAFE_PATH.fullmatch(value):
            raise ConfigError(f"{source}: node.{key} = {value!r} must be an absolute path of letters, digits "
                              f"and _ . @ + / -")
    return cfg


@dataclass(frozen=True)
class NodePaths:
    """Where one node keeps its things."""

    node_dir: Path
    mps_dir: Path
    socket: Path

    @classmethod
    def of(cls, cfg: NodeConfig, node: str) -> NodePaths:
        node_dir = Path(cfg.state_dir) / node
        mps_dir = Path(cfg.mps_dir) / node if cfg.mps_dir else node_dir / "mps"
        socket = Path(cfg.socket_path) if cfg.socket_path else node_dir / "control.sock"
        return cls(node_dir, mps_dir, socket)

    @property
    def state_file(self) -> Path:
        return self.node_dir / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.node_dir / "state.lock"

    @property
    def simulated_file(self) -> Path:
        return self.node_dir / "simulated-gpus.json"

    def mps_pipe_dir(self, index: int) -> Path:
        return self.mps_dir / f"gpu{index}" / "pipe"

    def mps_log_dir(self, index: int) -> Path:
        return self.mps_dir / f"gpu{index}" / "log"
