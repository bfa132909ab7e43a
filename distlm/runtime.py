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


@dataclass(frozen=True)
class RayTarget:
    """Where a process gets its Ray: `address` to join, or None to start one here."""

    address: Optional[str]
    note: str = ""  # a console line when the choice is not what the config says in so many words
    recorded: bool = False  # found through `ray start`'s record, as ray.init() finds it


def ray_target(address: Optional[str]) -> RayTarget:
    """The Ray to join, as ray.init() picks it: `address` (cluster.address), else $RAY_ADDRESS, else
    the Ray that `ray start` runs on this machine; 'local' (or nothing found) starts one here.
    Ray itself would wait minutes on an address nobody answers, so: a named address that does not
    answer is a ConfigError, and a `ray start` record left by a Ray that is gone is passed over."""
    if address == "local":
        return RayTarget(None)
    source = "cluster.address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if not _answers(address):
            raise ConfigError(
                f"no Ray answers at {address} ({source}): start it (`ray start --head`), fix {source}, "
                "or unset it (cluster.address=local) to let distlm start a Ray of its own"
            )
        return RayTarget(address)
    recorded, record = _ray_start_record()
    if recorded is None:
        return RayTarget(None)
    if not _answers(recorded):
        return RayTarget(
            None,
            f"`ray start` left a record of a Ray at {recorded} ({record}) that no longer answers: starting "
            "one of this run's own (`ray stop` removes the record)",
        )
    return RayTarget(
        recorded,
        f"joined the Ray that `ray start` runs at {recorded} (cluster.address=local starts one of this run's own)",
        recorded=True,
    )


def _ray_start_record() -> tuple[Optional[str], str]:
    """The GCS address `ray start` records on this machine (`ray stop` removes it), read the way
    ray.init() reads it. Ray's function is private: pinned by tests/test_ray_target.py."""
    from ray._common.utils import get_ray_address_file
    from ray._private.utils import read_ray_address

    return read_ray_address(), get_ray_address_file(None)


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to a host:port address opens (Ray's GCS listens there). Other forms
    (ray://, auto) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "/" in address or not port.isdigit():
        return True
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def init_ray(address: Optional[str], cpus_needed: float, quiet: bool = False, dashboard: Optional[bool] = None) -> bool:
    """Join the Ray that ray_target(address) names, else start one here with at least
    `cpus_needed` CPUs (more than the machine's cores when a run asks for them: Ray's CPUs are
    counts for scheduling). quiet: Ray's start-up lines and the actors' output stay off the
    console. dashboard: Ray's dashboard on a cluster started here (None: Ray's default, on
    when installed). True when this process started the cluster."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    kwargs = {"log_to_driver": False, "logging_level": logging.ERROR} if quiet else {}
    target = ray_target(address)
    if target.address:
        # A recorded Ray is joined as ray.init() finds it itself: only then does Ray take up the
        # token of `ray start`'s token authentication (~/.ray/auth_token) without RAY_AUTH_MODE.
        ray.init(address=None if target.recorded else target.address, **kwargs)
        return False
    # "local": a Ray of this process's own even where ray.init() would join a recorded one.
    cpus = max(math.ceil(cpus_needed), os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, **kwargs)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
