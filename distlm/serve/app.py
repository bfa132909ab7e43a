"""The Ray Serve application: one deployment whose replicas each hold an engine (the base model
once with every task adapter; engines/) and serve the FastAPI routes of distlm.serve.api.

Import paths for Ray's own tools and KubeRay's RayService:

    serve run distlm.serve.app:build_app path=runs/<run> max_batch_size=16
    DISTLM_SERVE_PATH=runs/<run> serve build distlm.serve.app:app -o serve.yaml

`build_app` takes `path` plus any key of ServeConfig (strings are converted, as `serve run`
passes them); overload settings, replicas and resources become deployment options.

Other deployments (the agent's router) call the engine through a handle:
`handle.options(stream=True).generate.remote(GenerationRequest(...))` streams TokenEvents.
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Dict, Optional, Union

from ray import serve
from ray.serve import Application

from distlm.config import ConfigError, ServeConfig, validate_serve
from distlm.export import ExportInfo, find_export
from distlm.serve.engines import GenerationRequest, TokenEvent, build_engine

PATH_ENV = "DISTLM_SERVE_PATH"


@serve.deployment(name="distlm")
@serve.ingress()  # the FastAPI app is built per replica by __serve_build_asgi_app__
class DistlmModel:
    def __init__(self, export: ExportInfo, cfg: ServeConfig, api_key: Optional[str] = None) -> None:
        import torch

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.engine = build_engine(export, cfg)
        self.export = export
        # The key resolved where the app was built, else this replica's own environment (a pod's secret).
        self.cfg, self.api_key = cfg, api_key or resolve_api_key(cfg)

    def __serve_build_asgi_app__(self):
        from distlm.serve.api import build_api

        replica = serve.get_replica_context().replica_id.unique_id
        return build_api(self.engine, self.export, self.cfg, self.api_key, replica)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """The engine's stream for one request (for other deployments, through a handle)."""
        async for event in self.engine.generate(request):
            yield event

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def deployment_options(cfg: ServeConfig) -> Dict[str, Any]:
    from ray.serve.config import BackpressureConfig

    options: Dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=cfg.overload_status, retry_after_s=cfg.retry_after_s),
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # Ctrl-C / SIGTERM: a replica finishes what it runs for at most this long before it stops.
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }
    if cfg.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def resolve_api_key(cfg: ServeConfig) -> Optional[str]:
    return cfg.api_key or os.environ.get(cfg.api_key_env) or None


def build(export: ExportInfo, cfg: ServeConfig) -> Application:
    return DistlmModel.options(**deployment_options(cfg)).bind(export, cfg, resolve_api_key(cfg))


def serve_config(args: Dict[str, Any]) -> ServeConfig:
    """A validated ServeConfig from builder args (typed YAML values or `serve run`'s strings)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ServeConfig), args))
    except OmegaConfBaseException as e:
        raise ConfigError(f"serve argument {getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from e
    validate_serve(cfg)
    return cfg


def build_app(args: Dict[str, Union[str, Any]]) -> Application:
    """Ray Serve application builder: `path` (a run or export directory) plus ServeConfig keys.
    host, port, app_name and route_prefix only matter to `distlm serve`; under `serve run` or
    a RayService they come from Ray's own options."""
    args = dict(args)
    path = args.pop("path", None)
    if not path:
        raise ConfigError(
            "build_app needs path=<run dir or export dir>, e.g. serve run distlm.serve.app:build_app path=runs/x"
        )
    cfg = serve_config(args)
    return build(find_export(str(path), cfg.model_name), cfg)


def __getattr__(name: str) -> Application:
    # `serve build` wants an Application object at an import path: `distlm.serve.app:app`,
    # built from the directory in $DISTLM_SERVE_PATH.
    if name == "app":
        if not os.environ.get(PATH_ENV):
            raise AttributeError(f"distlm.serve.app:app needs {PATH_ENV}=<run dir or export dir> in the environment")
        return build_app({"path": os.environ[PATH_ENV]})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
