"""The festina configuration file (TOML): its schema, documented defaults and loader.

The config is read once, in the CLI's ``main()``, into a frozen ``Config`` and
passed down; nothing else reads files or the environment for settings. Every
key has a default, so an empty file (or no file) is a valid config. An unknown
section or key, or a value of the wrong type or outside its allowed set, is a
``ConfigError`` whose one-line message names the file, the key and the value.
``festina config show`` prints the resolved config; ``festina.example.toml``
at the repository root documents every key.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from festina_hpc.cluster.figures import ClusterConfig
from festina_hpc.cluster.slo import DEFAULT_TBT_MULTIPLIER, DEFAULT_TTFT_MULTIPLIER
from festina_hpc.errors import ConfigError
from festina_hpc.profiles.store import ProfileStore

GPU_BACKENDS = ("auto", "nvml", "simulated")
OUT_OF_RANGE_MODES = ("error", "clamp")
POWER_SAVING_MODES = ("slurm", "none")


def default_profiles_dir() -> Path:
    """Where the shipped profiles are: the source tree, else the installed share dir."""
    source_tree = Path(__file__).resolve().parent.parent / "profiles"
    if (source_tree / "gpus.toml").is_file():
        return source_tree
    return Path(sys.prefix) / "share" / "festina-hpc" / "profiles"


@dataclass(frozen=True)
class ProfilesConfig:
    # Folder holding gpus.toml, models.toml and <gpu>/<model>.csv; "" = shipped profiles.
    dir: str = ""
    # What a lookup outside a table's axes does: "error" raises, "clamp" answers
    # at the nearest table edge and flags the answer as clamped.
    out_of_range: str = "error"

    def resolved_dir(self) -> Path:
        return Path(self.dir) if self.dir else default_profiles_dir()

    def open_store(self) -> ProfileStore:
        """The profile store this section names."""
        return ProfileStore(self.resolved_dir(), clamp=self.out_of_range == "clamp")


def default_db_url() -> str:
    """The default database: a SQLite file in the user's state folder.

    ``$XDG_STATE_HOME/festina/festina.db``, else ``~/.local/state/festina/festina.db``: state
    (not cache, not config) is what XDG calls data that survives restarts but is not worth
    backing up as a document. Read when a command resolves it, never at import time.
    """
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite:///{Path(state_home) / 'festina' / 'festina.db'}"


@dataclass(frozen=True)
class DbConfig:
    # SQLAlchemy URL of festina's database: "sqlite:///PATH" or "postgresql+psycopg://USER@HOST/DB";
    # "" = a SQLite file in the user's state folder (see default_db_url). --db-url and
    # FESTINA_DB_URL override it.
    url: str = ""
    # Days raw energy samples are kept (`festina db prune` deletes older ones; the rollups that
    # reports read are kept for ever). 0 = keep every sample.
    sample_retention_days: int = 30

    def resolved_url(self) -> str:
        return self.url or default_db_url()


@dataclass(frozen=True)
class GpuConfig:
    # "nvml" (real GPUs via pynvml), "simulated" (profile-driven fake GPUs) or
    # "auto" (NVML when a GPU answers, else simulated).
    backend: str = "auto"
    # GPU type and count of the simulated backend (a profile GPU name).
    simulated_type: str = "h100-sxm-80gb"
    simulated_count: int = 2
    # Whether the serving engine can change a running instance's SM share. An MPS client's
    # active-thread percentage is fixed when its CUDA context is created (NVIDIA), so by default a
    # different share is a new instance at that share (start, shift traffic, stop the old one).
    # True only where a site's engine has its own mechanism for it.
    live_share_change: bool = False


@dataclass(frozen=True)
class SimConfig:
    """Defaults of ``festina sim``; each has a command-line option that overrides it."""

    seed: int = 0
    models: int = 8  # the first N of the default model mix
    popularity: str = "zipf:1.0"  # how requests without a model column are spread over the models
    rate_scale: float = 1.0  # 2.0 replays the trace twice as fast
    duration_s: float = 0.0  # 0: the whole trace
    # Default SLOs: multiples of the unloaded latency at max clock (see cluster/slo.py).
    ttft_slo_multiplier: float = DEFAULT_TTFT_MULTIPLIER
    tbt_slo_multiplier: float = DEFAULT_TBT_MULTIPLIER
    keep_alive_s: float = 60.0  # idle time after which scale-to-zero policies stop an instance
    # The trace starts this late, so that policies that deploy models up front can load them first;
    # every policy is charged for the same span.
    warmup_s: float = 60.0


@dataclass(frozen=True)
class DaemonConfig:
    """festinad (``festina daemon``): gateway, policy, Slurm and its periodic jobs; options override."""

    host: str = "127.0.0.1"  # the gateway's bind address
    port: int = 8000
    policy: str = "festina"
    models: str = ""  # comma-separated models served; "" = every model with a profile on gpu_type
    gpu_type: str = "h100-sxm-80gb"  # the profile GPU of the cluster's GPUs
    slurm_backend: str = "auto"
    slurm_timeout_s: float = 30.0  # one Slurm command; a hung one is killed and retried with back-off
    partition: str = ""  # of serving jobs; "" = the cluster's default
    engine: str = "emulated"  # what serving jobs run: "emulated" (no GPU) or "vllm"
    serve_time_scale: float = 1.0  # emulated engine's pace (tests: < 1 runs faster than real time)
    job_output_dir: str = ""  # serving jobs' logs; "" = /tmp
    # Instances' secret files (0700, festinad's), on a filesystem the nodes share ([node] secret_dir).
    secret_dir: str = ""  # "" = <job_output_dir>/secrets
    serve_port_base: int = 20000  # serving jobs listen on a port festinad picks from here up
    scale_timeout_s: float = 120.0  # longest a request waits for an instance to start
    start_timeout_s: float = 300.0  # a serving job that does not answer /health by then is cancelled
    drain_timeout_s: float = 30.0  # a stopping instance's requests get this long before scancel
    reconcile_period_s: float = 10.0
    scale_period_s: float = 0.0  # 0 = the policy's own period
    consolidate_period_s: float = 0.0  # 0 = the policy's own period
    keep_alive_s: float = 60.0  # idle time before scale-to-zero
    max_prompt_tokens: int = 0  # 0 = the model's context length
    ttft_slo_multiplier: float = DEFAULT_TTFT_MULTIPLIER
    tbt_slo_multiplier: float = DEFAULT_TBT_MULTIPLIER
    # festinad's GET /metrics listens here, apart from the gateway, so host may be 0.0.0.0 for users
    # while the scrape (model names, request counts, power) stays on the head node; "" = no metrics.
    # Prometheus elsewhere: bind an address only it reaches, e.g. "10.0.0.1:9464" on the admin network.
    metrics_listen: str = "127.0.0.1:9464"
    # /admin/* (consolidate, drain a model, node control) with [gateway] require_keys = false: only
    # from the loopback address unless this is true; with require_keys = true it needs an admin key.
    admin_open: bool = False

    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as (host, port); None when it is off."""
        return parse_listen(self.metrics_listen)


def parse_listen(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as (host, port); "" is None (off); ValueError otherwise."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if (not sep or not host or any(c.isspace() for c in host) or (":" in host) != bracketed
            or not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError(value)
    return host, int(port)


@dataclass(frozen=True)
class GatewaySettings:
    """``[gateway]``: who may send festinad's gateway requests (``festina keys``), and accounts' energy quotas."""

    require_keys: bool = False  # False: an open gateway; keyless requests go to default_user/default_account
    default_user: str = ""
    default_account: str = ""
    key_cache_ttl_s: float = 10.0  # a revoked key is refused within this long
    # [gateway.account_energy_quota_j_per_day]: account = J of GPU energy per UTC day (none: no quota)
    account_energy_quota_j_per_day: Mapping[str, float] = field(default_factory=dict)
    over_quota: str = "refuse"  # or "deprioritize"
    quota_refresh_s: float = 60.0  # the accounts' energy is re-read at most this often


@dataclass(frozen=True)
class NodeControlConfig:
    """festinad's signed channel to festina-node (``[node] control_port`` on the nodes; see docs/admin-guide.md)."""

    port: int = 0  # the nodes' control_port; 0 = festinad does not control nodes directly
    auth: str = "munge"  # munge (credentials as festinad's user) | secret (HMAC under secret_file)
    secret_file: str = ""  # mode 600: the same key as the nodes' control_secret_file
    munge_socket: str = ""  # munged's socket; "" = munge's default
    timeout_s: float = 10.0  # one request to one node
    # [node_control.ports]: node = port, for nodes that listen elsewhere than ``port`` (a dev cluster's nodes
    # share one address, each on its own port)
    ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SloOverride:
    """``[slo."<model>"]``: a model's TTFT and TBT SLOs in seconds."""

    ttft_s: float = 0.0
    tbt_s: float = 0.0


@dataclass(frozen=True)
class Config:
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slo: Mapping[str, SloOverride] = field(default_factory=dict)
    db: DbConfig = field(default_factory=DbConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    node_control: NodeControlConfig = field(default_factory=NodeControlConfig)
    source: str = "<defaults>"


_SECTION_TYPES: dict[str, type] = {"profiles": ProfilesConfig, "gpu": GpuConfig, "sim": SimConfig,
                                   "cluster": ClusterConfig, "db": DbConfig,
                                   "daemon": DaemonConfig, "node_control": NodeControlConfig,
                                   "gateway": GatewaySettings}

# Allowed values per (section, key), beyond the type check.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("profiles", "out_of_range"): OUT_OF_RANGE_MODES,
    ("gpu", "backend"): GPU_BACKENDS,
    ("cluster", "power_saving"): POWER_SAVING_MODES,
    ("daemon", "engine"): ("emulated", "vllm"),
    ("daemon", "slurm_backend"): ("auto", "cli", "pyslurm"),
    ("gateway", "over_quota"): ("refuse", "deprioritize"),
    ("node_control", "auth"): ("munge", "secret"),
}
_POSITIVE: set[tuple[str, str]] = {("gpu", "simulated_count"), ("sim", "models"), ("sim", "rate_scale"),
                                    ("sim", "ttft_slo_multiplier"), ("sim", "tbt_slo_multiplier")}
_NON_NEGATIVE: set[tuple[str, str]] = {("sim", "duration_s"), ("sim", "keep_alive_s"), ("sim", "warmup_s"),
                                       ("db", "sample_retention_days")}
_POSITIVE |= {("daemon", k) for k in ("port", "slurm_timeout_s", "serve_time_scale", "serve_port_base",
                                      "scale_timeout_s", "start_timeout_s", "reconcile_period_s",
                                      "ttft_slo_multiplier", "tbt_slo_multiplier")}
_NON_NEGATIVE |= {("gateway", "key_cache_ttl_s"), ("gateway", "quota_refresh_s")}
_POSITIVE |= {("node_control", "timeout_s")}
_NON_NEGATIVE |= {("node_control", "port")}
_NON_NEGATIVE |= {("daemon", k) for k in ("drain_timeout_s", "scale_period_s", "consolidate_period_s",
                                          "keep_alive_s", "max_prompt_tokens")}
_LISTEN: set[tuple[str, str]] = {("daemon", "metrics_listen")}
# Every number of the cluster's physical figures must be positive, except the power of a node that is
# off and the count of nodes power saving leaves alone.
_ZERO_OK = ("standby_w", "suspend_exc_nodes")
_POSITIVE |= {("cluster", f.name) for f in dataclasses.fields(ClusterConfig)
              if f.type in ("int", "float") and f.name not in _ZERO_OK}
_NON_NEGATIVE |= {("cluster", name) for name in _ZERO_OK}


def _build_section(source: str, name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [{name}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {name}.{key} = {value!r} "
                              f"(known: {', '.join(sorted(fields))})")
        expected = type(fields[key].default)
        # TOML integers are acceptable where a float is expected, never the reverse.
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{source}: {name}.{key} must be {expected.__name__}, got {value!r}")
        choices = _CHOICES.get((name, key))
        if choices is not None and value not in choices:
            raise ConfigError(f"{source}: {name}.{key} = {value!r} is not one of {', '.join(choices)}")
        if (name, key) in _POSITIVE and value <= 0:
            raise ConfigError(f"{source}: {name}.{key} = {value!r} must be positive")
        if (name, key) in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{source}: {name}.{key} = {value!r} must not be negative")
        if (name, key) in _LISTEN:
            try:
                parse_listen(value)
            except ValueError:
                raise ConfigError(f"{source}: {name}.{key} = {value!r} must be HOST:PORT (e.g. 127.0.0.1:9464, "
                                  "[::1]:9464) or \"\" (off)") from None
        values[key] = value
    return cls(**values)


def config_from_mapping(raw: Mapping[str, Any], source: str = "<mapping>") -> Config:
    """Validate a parsed TOML document into a ``Config``."""
    built: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "slo":
            built[name] = _slo_overrides(source, value)
            continue
        if name not in _SECTION_TYPES:
            known = ", ".join(sorted([*_SECTION_TYPES, "slo"]))
            raise ConfigError(f"{source}: unknown section [{name}] (known: {known})")
        tables = {key: read for (section_name, key), read in _TABLES.items() if section_name == name}
        if isinstance(value, Mapping) and tables.keys() & value.keys():
            section = _build_section(source, name, _SECTION_TYPES[name],
                                     {k: v for k, v in value.items() if k not in tables})
            built[name] = dataclasses.replace(section, **{key: tables[key](source, value[key])
                                                          for key in tables.keys() & value.keys()})
            continue
        built[name] = _build_section(source, name, _SECTION_TYPES[name], value)
    return Config(**built, source=source)


_QUOTAS = "account_energy_quota_j_per_day"


def _quotas(source: str, raw: Any) -> dict[str, float]:
    """``[gateway.account_energy_quota_j_per_day]``: account = positive joules per day."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: gateway.{_QUOTAS} must be a table of account = joules per day, got {raw!r}")
    quotas = {}
    for account, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise ConfigError(f'{source}: gateway.{_QUOTAS}."{account}" = {value!r} must be a positive number of J')
        quotas[str(account)] = float(value)
    return quotas


def _node_ports(source: str, raw: Any) -> dict[str, int]:
    """``[node_control.ports]``: node = the port its festina-node listens on, where it is not ``port``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: node_control.ports must be a table of node = port, got {raw!r}")
    ports = {}
    for node, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ConfigError(f'{source}: node_control.ports."{node}" = {value!r} must be a port in 1..65535')
        ports[str(node)] = value
    return ports


# Sub-tables of a section, each read by its own function: (section, key) -> reader.
_TABLES: dict[tuple[str, str], Callable[[str, Any], Any]] = {("gateway", _QUOTAS): _quotas,
                                                             ("node_control", "ports"): _node_ports}


def _slo_overrides(source: str, raw: Any) -> dict[str, SloOverride]:
    """``[slo."<model>"]`` tables; model names are checked against the profiles when used."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [slo] must hold one table per model, got {raw!r}")
    overrides = {}
    for model, entry in raw.items():
        override = _build_section(source, f'slo."{model}"', SloOverride, entry)
        for key in ("ttft_s", "tbt_s"):
            value = getattr(override, key)
            if key not in entry or value <= 0:
                raise ConfigError(f'{source}: slo."{model}".{key} = {entry.get(key)!r} must be a positive number')
        overrides[model] = override
    return overrides


def load_config(path: Path | None) -> Config:
    """Read and validate a TOML config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return config_from_mapping(raw, source=str(path))


def config_as_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (for ``festina config show``)."""
    return dataclasses.asdict(config)
