"""The Ray Serve application: one deployment whose replicas each hold the base model once with
every task adapter, batch concurrent requests with `@serve.batch`, and serve the FastAPI
routes of distlm.serve.api.

Import paths for Ray's own tools and KubeRay's RayService:

    serve run distlm.serve.app:build_app path=runs/<run> max_batch_size=16
    DISTLM_SERVE_PATH=runs/<run> serve build distlm.serve.app:app -o serve.yaml

`build_app` takes `path` plus any key of ServeConfig (strings are converted, as `serve run`
passes them); overload settings, replicas and resources become deployment options.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from ray import serve
from ray.serve import Application

from distlm.config import ConfigError, ServeConfig, validate_serve
from distlm.serve.model import ExportInfo, GenerationRequest, ServedModel, TokenEvent, find_export

PATH_ENV = "DISTLM_SERVE_PATH"


def _device_and_dtype(cfg: ServeConfig):
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


@serve.deployment(name="distlm")
@serve.ingress()  # the FastAPI app is built per replica by __serve_build_asgi_app__
class DistlmModel:
    def __init__(self, export: ExportInfo, cfg: ServeConfig, api_key: Optional[str] = None) -> None:
        import torch

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        device, dtype = _device_and_dtype(cfg)
        self.model = ServedModel(export, device, dtype, cfg.agent)
        # The key resolved where the app was built, else this replica's own environment (a pod's secret).
        self.cfg, self.api_key = cfg, api_key or resolve_api_key(cfg)
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        from distlm.serve.api import build_api

        replica = serve.get_replica_context().replica_id.unique_id
        return build_api(self.model, self.generate, self.cfg, self.api_key, replica)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        async for event in self.generate_batch(request):
            yield event

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # replaced from the config in __init__
    async def generate_batch(self, requests: List[GenerationRequest]):
        """Requests that arrive within batch_wait_timeout_s (up to max_batch_size) decode together;
        each step runs in a thread so the replica keeps accepting requests meanwhile."""
        steps = self.model.steps(requests)
        while (events := await asyncio.to_thread(next, steps, None)) is not None:
            # StopIteration ends that request's stream (Ray Serve's protocol for batched generators).
            yield [StopIteration if e is None else e for e in events]


def deployment_options(cfg: ServeConfig) -> Dict[str, Any]:
    from ray.serve.config import BackpressureConfig

    options: Dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=cfg.overload_status, retry_after_s=cfg.retry_after_s),
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
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
