"""``festina daemon`` (also the ``festinad`` script): build festinad's backends from the config and run it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from festina_hpc.cli.common import AppContext, pass_app
from festina_hpc.errors import ConfigError, FestinaError


@click.command("daemon")
@click.option("--host", default=None, help="Gateway bind address [config daemon.host].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Gateway port [config daemon.port].")
@click.option("--policy", default=None, help="Policy name [config daemon.policy; default festina].")
@click.option("--models", default=None,
              help="Comma-separated models to serve, overriding the catalogue (`festina models`) "
                   "[else the catalogue, else config daemon.models].")
@click.option("--db-url", default=None, metavar="URL",
              help="Database URL (default: $FESTINA_DB_URL, else the config's [db] url, else SQLite).")
@click.option("--slurm-conf", type=click.Path(path_type=Path), default=None,
              help="slurm.conf of the cluster (default: $SLURM_CONF, else Slurm's own default).")
@click.option("-v", "--verbose", count=True,
              help="-v: festina's own lines at INFO (default WARNING); -vv: DEBUG, and other libraries' INFO "
                   "(the scheduler's runs, the migration tool, the HTTP server) too.")
@pass_app
def daemon(app: AppContext, host: str | None, port: int | None, policy: str | None, models: str | None,
           db_url: str | None, slurm_conf: Path | None, verbose: int) -> None:
    """Run festinad: the gateway, the policy's placement, scaling and consolidation, through Slurm."""
    from festina_hpc.daemon.auth import AuthConfig, Authenticator, DbEnergyUsage
    from festina_hpc.daemon.catalogue_models import catalogue_gateway_models, catalogue_model_options
    from festina_hpc.daemon.festinad import Festinad, FestinadSettings, StoreRecorder
    from festina_hpc.daemon.gateway import GatewayConfig, gateway_models
    from festina_hpc.daemon.node_control import node_control_from_config
    from festina_hpc.daemon.service import Periods, run_festinad
    from festina_hpc.db import migrate
    from festina_hpc.db.catalogue import Catalogue
    from festina_hpc.db.engine import check_connection, make_engine, resolve_db_url
    from festina_hpc.db.keys import KeyRing
    from festina_hpc.db.store import Store
    from festina_hpc.logs import configure_logging
    from festina_hpc.policy.base import PolicyContext, make_policy
    from festina_hpc.slurm.factory import make_slurm_client

    configure_logging(verbose, fmt="%(asctime)s festinad %(levelname)s %(name)s: %(message)s")
    cfg = app.config.daemon
    store = app.profile_store()
    gpu = store.gpu(cfg.gpu_type).name
    resolved = resolve_db_url(db_url, os.environ, app.config.db, config_source=app.config.source)
    engine = make_engine(resolved.url)
    check_connection(engine)
    migrate.upgrade(engine)  # festinad's schema is this package's: bring a new or older database up to it
    db = Store(engine)

    # The catalogue names the served models and their SLOs; --models overrides it, [daemon] models bootstraps.
    entries = [] if models is not None else Catalogue(engine, store).list()
    served = catalogue_gateway_models(entries, store, gpu, cfg.max_prompt_tokens)
    # Bounds, engine arguments and accounts are the catalogue's; --models and [daemon] models have none.
    options = catalogue_model_options(entries, store, gpu) if served else {}
    if not served:
        names = [m.strip() for m in (models if models is not None else cfg.models).split(",") if m.strip()]
        if not names:
            names = sorted(model for g, model in store.shipped() if g == gpu)
        if not names:
            raise ConfigError(f"no model has a profile on {gpu}: set daemon.models")
        served = gateway_models(store, gpu, names, cfg.ttft_slo_multiplier, cfg.tbt_slo_multiplier,
                                cfg.max_prompt_tokens)
    slos = {m.name: m.slo for m in served}
    chosen = make_policy(policy or cfg.policy, PolicyContext(store, gpu, keep_alive_s=cfg.keep_alive_s))

    conf = slurm_conf or (Path(os.environ["SLURM_CONF"]) if os.environ.get("SLURM_CONF") else None)
    slurm = make_slurm_client(cfg.slurm_backend, conf, timeout_s=cfg.slurm_timeout_s)
    settings = FestinadSettings(engine=cfg.engine, serve_time_scale=cfg.serve_time_scale,
                                job_output_dir=cfg.job_output_dir or "/tmp", secret_dir=cfg.secret_dir,
                                serve_port_base=cfg.serve_port_base,
                                partition=cfg.partition or None, start_timeout_s=cfg.start_timeout_s,
                                drain_timeout_s=cfg.drain_timeout_s)
    festinad = Festinad(chosen, store, slurm, db, slos, settings, model_options=options)
    # Where a node listens is Slurm's NodeAddr, learnt at setup; the name where Slurm gives none.
    festinad.node_control = node_control_from_config(app.config.node_control,
                                                     lambda node: festinad.node_address.get(node) or node)
    recorder = StoreRecorder(db)
    periods = Periods(reconcile_s=cfg.reconcile_period_s, scale_s=cfg.scale_period_s or chosen.scale_period_s,
                      consolidate_s=cfg.consolidate_period_s or chosen.consolidate_period_s)
    gw = app.config.gateway
    auth = Authenticator(KeyRing(engine, store), AuthConfig(
        require_keys=gw.require_keys, default_user=gw.default_user, default_account=gw.default_account,
        key_cache_ttl_s=gw.key_cache_ttl_s, account_energy_quota_j_per_day=gw.account_energy_quota_j_per_day,
        over_quota=gw.over_quota, quota_refresh_s=gw.quota_refresh_s), DbEnergyUsage(engine))
    if not gw.require_keys:
        logging.getLogger("festinad").warning(
            "the gateway is open ([gateway] require_keys = false): requests without a key are served as %s/%s",
            gw.default_user or "''", gw.default_account or "''")
    if cfg.admin_open and not gw.require_keys:
        logging.getLogger("festinad").warning(
            "the admin API is open to every address ([daemon] admin_open = true, [gateway] require_keys = false): "
            "anyone who reaches the gateway can drain models and set GPU clocks")
    bind_host = host or cfg.host
    bind_port = port or cfg.port

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            metrics = f"metrics http://{cfg.metrics_listen}/metrics" if cfg.metrics_listen else "no metrics"
            click.echo(f"festinad: {url} ({chosen.name}, {len(served)} models, db {resolved.masked()}, {metrics})")
            sys.stdout.flush()

        await run_festinad(festinad, recorder, served, bind_host, bind_port, stop, periods,
                           GatewayConfig(scale_timeout_s=cfg.scale_timeout_s), on_ready=ready, auth=auth,
                           admin_open=cfg.admin_open, metrics_listen=cfg.metrics_address())
        click.echo("festinad: stopped")

    try:
        asyncio.run(main())
    except OSError as exc:
        raise FestinaError(f"cannot serve on {bind_host}:{bind_port}: {exc.strerror or exc}") from None


def festinad_main() -> int:
    """The ``festinad`` console script: ``festina daemon`` with the same options."""
    from festina_hpc.cli.main import main

    return main(["daemon", *sys.argv[1:]])
