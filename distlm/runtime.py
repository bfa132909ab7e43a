"""Device, backend, precision and dtype from the cluster config and the hardware, the one
cross-rank reduction the loop and evaluation share, and starting or joining Ray. No DeepSpeed
here, and torch only when used: the driver, the workers, serving and the node launcher all
import this module."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

from distlm.config import ClusterConfig, ConfigError

if TYPE_CHECKING:
    import torch


def torch_dtype(precision: str) -> torch.dtype:
    """fp32 | bf16 | fp16 as a torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class Runtime:
    device: str  # cpu | cuda
    backend: str  # gloo | nccl
    precision: str  # fp32 | bf16 | fp16

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.precision)


def resolve_runtime(cluster: ClusterConfig, cuda_available: Optional[bool] = None) -> Runtime:
    """Turn the 'auto' settings into concrete ones for the hardware at hand."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = cluster.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ConfigError("cluster.device=cuda but no GPU is visible: use cluster.device=auto or cpu")
    backend = cluster.backend if cluster.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device == "cpu":
        raise ConfigError("cluster.backend=nccl needs GPUs: use cluster.backend=gloo (or auto) on CPU")
    precision = cluster.precision if cluster.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    if device == "cpu" and precision == "fp16":
        raise ConfigError("cluster.precision=fp16 is not supported on CPU: use fp32 or bf16")
    return Runtime(device=device, backend=backend, precision=precision)


def serving_device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """serve.device / serve.dtype ('auto': cuda and bf16 when this process sees a GPU, else cpu and fp32)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return device, torch_dtype(dtype)


def all_reduce_sum(values: Sequence[Union[float, torch.Tensor]], device: Union[str, torch.device]) -> List[float]:
    """Sums over ranks in one collective, on the device the backend needs (nccl: the GPU), and one
    host synchronisation for the result. Tensors among the values stay on the device until then."""
    import torch
    import torch.distributed as dist

    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def apply_collective_timeout(seconds: int) -> None:
    """Every process group created from now on in this worker times its collectives out after
    `seconds` (cluster.collective_timeout_s). Ray Train gives its world group that timeout, but
    DeepSpeed makes its own groups (ZeRO's data-parallel group), which torch would otherwise give
    its 30-minute default: a stalled rank would hang the others for half an hour."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=seconds)
    c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def init_ray(address: Optional[str], cpus_needed: float, quiet: bool = False, dashboard: Optional[bool] = None) -> bool:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), else start one here with at least
    `cpus_needed` CPUs (more than the machine's cores when a run asks for them: Ray's CPUs are
    counts for scheduling). quiet: Ray's start-up lines and the actors' output stay off the
    console. dashboard: Ray's dashboard on a cluster started here (None: Ray's default, on
    when installed). True when this process started the cluster."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    kwargs = {"log_to_driver": False, "logging_level": logging.ERROR} if quiet else {}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return False
    ray.init(num_cpus=max(math.ceil(cpus_needed), os.cpu_count() or 1), include_dashboard=dashboard, **kwargs)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
