"""`rayft serve`: check the config, start the Serve application, run until Ctrl-C / SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Optional

from rayft.config import ServeConfig
from rayft.errors import ConfigError


def preflight(cfg: ServeConfig) -> None:
    """Everything that can be wrong with the config fails here, in one line, before Ray starts."""
    from rayft.models import resolve_model_path
    from rayft.serve.keys import KeyStore
    from rayft.serve.registry import AdapterRegistry

    resolve_model_path(cfg.base_model.name_or_path)
    if cfg.auth.keys_file:
        if not os.path.isfile(cfg.auth.keys_file):
            raise ConfigError(f"auth.keys_file={cfg.auth.keys_file}: no such file (create keys with rayft keys create)")
        KeyStore(cfg.auth.keys_file)  # parses it
    registry = AdapterRegistry(cfg.registry)
    for name in cfg.adapters:
        tenant, _, adapter = name.rpartition("/")
        if registry.resolve(tenant or "default", adapter) is None:
            raise ConfigError(f"adapters: {name!r} is not in the registry {registry.root} (rayft adapters publish)")
    if len(cfg.adapters) > cfg.max_resident_adapters:
        raise ConfigError(f"adapters: {len(cfg.adapters)} preloaded, above max_resident_adapters={cfg.max_resident_adapters}")


SERVE_LOG = "serve.log"


def run_server(cfg: ServeConfig, verbose: bool = False) -> None:
    """The console shows one ready line; the driver's output (Ray's, Serve's and what Ray forwards
    from the replicas) goes to log_dir/serve.log, unless `verbose`. Serve keeps each replica's
    own log, access lines included, in Ray's session folder (logs/serve/)."""
    from rayft.console import RunConsole

    preflight(cfg)
    with RunConsole(verbose) as run_console:
        log = run_console.move_to(Path(cfg.log_dir), SERVE_LOG)
        _serve_until_stopped(cfg, log)


def _serve_until_stopped(cfg: ServeConfig, log: Optional[Path]) -> None:
    from ray import serve

    from rayft.console import say
    from rayft.raycluster import connect_ray
    from rayft.serve.app import APP_NAME, base_model_id, serve_application

    shared_cluster = bool(os.environ.get("RAY_ADDRESS"))
    connect_ray(None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(serve_application(cfg), name=APP_NAME, route_prefix="/")
        preloaded = f"; loaded: {', '.join(cfg.adapters)}" if cfg.adapters else ""
        say(f"serving {base_model_id(cfg)} and the adapters of {os.path.abspath(cfg.registry)} "
            f"({len(published_adapters(cfg))} published{preloaded}) on http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)"
            + (f"; logs in {log}" if log else ""))
        stop.wait()
    finally:
        # On a cluster others use, remove only this application; a local instance goes entirely.
        serve.delete(APP_NAME) if shared_cluster else serve.shutdown()


def published_adapters(cfg: ServeConfig) -> list:
    from rayft.serve.registry import AdapterRegistry

    return AdapterRegistry(cfg.registry).list(None)
