"""`distlm serve`: start (or join) Ray, run the app behind Ray Serve's HTTP proxy, block until
Ctrl-C or SIGTERM; either drains the replicas' requests, then stops."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import time
from typing import Optional, TextIO

from distlm.config import ConfigError, ServeConfig
from distlm.export import ExportInfo
from distlm.serve.app import build, resolve_api_key
from distlm.serve.proxy import CALLBACK, CALLBACK_ENV


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({e.strerror}): pick another port with serve.port=..."
            ) from e


def ray_for_serving(cfg: ServeConfig, ray_address: Optional[str] = None) -> bool:
    """Join the Ray that ray_target(ray_address) names (ray_address, $RAY_ADDRESS, a `ray start` on
    this machine), else start a local Ray. True if started here."""
    import ray

    from distlm.runtime import init_ray as start_or_join
    from distlm.runtime import ray_target

    if not ray.is_initialized() and ray_target(ray_address).address is None:
        _check_port_free(cfg.host, cfg.port)  # before Ray takes seconds to start
        # Ray's processes inherit it: the HTTP proxy answers overload and its other errors in JSON.
        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    return start_or_join(ray_address, cfg.num_cpus * (cfg.max_replicas or cfg.num_replicas))


def deploy(export: ExportInfo, cfg: ServeConfig) -> None:
    """Start Serve's HTTP proxy and run the app; returns once the replicas answer."""
    from ray import serve

    # On a cluster where Serve already runs, its HTTP options stay as they are (Ray warns).
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build(export, cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)


def stop(cfg: ServeConfig, started_ray: bool) -> None:
    """Drain, then stop: deleting the application lets each replica finish its requests (for at most
    serve.graceful_shutdown_timeout_s) while the proxy still relays their answers."""
    import ray
    from ray import serve

    try:
        serve.delete(cfg.app_name)
    finally:
        if started_ray:
            serve.shutdown()
        ray.shutdown()


def banner(export: ExportInfo, cfg: ServeConfig) -> str:
    url = base_url(cfg)
    body = json.dumps({"model": export.name, "prompt": "def main(", "max_tokens": 16})
    auth = f" -H 'Authorization: Bearer '\"${cfg.api_key_env}\"" if resolve_api_key(cfg) else ""
    from distlm.serve.engines import choose_engine

    engine, why = choose_engine(export, cfg.engine)
    lines = [
        f"distlm serve: {url}/v1 (OpenAI-style API; Ray Serve app '{cfg.app_name}')",
        f"models: {', '.join(export.model_ids)}"
        + (f" ({export.name} is the agent: its router picks the task per request)" if export.router else ""),
        f"engine: {engine}" + (f" ({why})" if why else ""),
        "try:",
        f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}",
        f'  python -c \'from openai import OpenAI; print(OpenAI(base_url="{url}/v1", api_key="...")'
        f'.completions.create(model="{export.name}", prompt="def main(").choices[0].text)\'',
        "Ctrl-C (or SIGTERM) finishes the requests in flight and stops the server.",
    ]
    return "\n".join(lines)


def serve_forever(
    export: ExportInfo, cfg: ServeConfig, ray_address: Optional[str] = None, out: TextIO = sys.stdout
) -> None:
    """Deploy, print where to send requests, and block; Ctrl-C or SIGTERM shut down cleanly."""

    def terminate(*_) -> None:
        # Once: a second Ctrl-C (or SIGTERM from a wrapper) must not interrupt the shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    # Explicit handlers: a parent (nohup, a non-interactive shell's `&`) may have left SIGINT ignored.
    # Set again once Ray is up: ray.init installs its own SIGTERM handler, which exits at once.
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    started_ray = ray_for_serving(cfg, ray_address)
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    try:
        deploy(export, cfg)
        print(banner(export, cfg), file=out, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("distlm serve: shutting down", file=out, flush=True)
    finally:
        stop(cfg, started_ray)
