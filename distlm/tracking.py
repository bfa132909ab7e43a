"""Experiment tracking: W&B on rank 0, a no-op tracker elsewhere, and the driver's metrics sink.

The loop calls `tracker.log(...)` on every rank; only rank 0 holds a real tracker, so
the loop never branches on rank to log (nanochat's DummyWandb habit).
"""

from __future__ import annotations

import functools
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from distlm.config import TrackingConfig


class NullTracker:
    run_id: Optional[str] = None

    def log(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def take_unsaved(self) -> List[Dict[str, Any]]:
        return []

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker:
    """Rank 0's tracker: W&B (if enabled) plus a push to the driver's metrics sink, at most every
    SEND_EVERY_S seconds (and at every checkpoint and the end): with trainer.log_every=1 a remote
    call per step would cost the step time on a busy machine, and the driver draws twice a second."""

    SEND_EVERY_S = 0.5

    def __init__(self, cfg: TrackingConfig, run_dir: str, run_id: Optional[str], config: Dict[str, Any], sink=None):
        self.sink = sink
        self.unsent: List[Dict[str, Any]] = []
        self.sent_at = 0.0
        self.wandb = None
        self.run_id = run_id
        # Records since the last checkpoint: saved in it, so that a driver killed before it wrote
        # them to metrics.jsonl loses none (the resumed run's driver reads them back).
        self.unsaved: List[Dict[str, Any]] = []
        if cfg.backend == "wandb":
            import wandb

            self.run_id = run_id or uuid.uuid4().hex[:12]
            # resume="allow" continues the same run id after a restart or a resume.
            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                id=self.run_id,
                resume="allow",
                mode=cfg.mode,
                dir=run_dir,
                config=config,
                tags=list(cfg.tags),
                name=Path(run_dir).name,
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )

    def log(self, metrics: Dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.unsaved.append({"step": step, **metrics})
        if self.sink is not None:
            self.unsent.append({"step": step, **metrics})
            if time.monotonic() - self.sent_at >= self.SEND_EVERY_S:
                self.flush()

    def flush(self) -> None:
        """Fire and forget: the driver writes metrics.jsonl and drives the progress bar."""
        if self.unsent and self.sink is not None:
            self.sink.put_many.remote(self.unsent)
            self.unsent = []
        self.sent_at = time.monotonic()

    def take_unsaved(self) -> List[Dict[str, Any]]:
        self.flush()  # a checkpoint: the driver has every record up to it
        out, self.unsaved = self.unsaved, []
        return out

    def finish(self) -> None:
        self.flush()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def make_tracker(
    cfg: TrackingConfig, rank: int, run_dir: str, run_id: Optional[str], config: Dict[str, Any], sink=None
):
    if rank != 0:
        return NullTracker()
    return Tracker(cfg, run_dir, run_id, config, sink)


class MetricsSink:
    """A tiny Ray actor (created by the driver) that buffers rank 0's metrics for the driver."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []
        self.placement: Dict[int, Dict[str, Any]] = {}
        self.memory: Dict[int, Dict[str, float]] = {}
        # Set by the driver's SIGTERM handler; the workers poll it every step.
        self.stop = False
        self.failures: List[Dict[str, Any]] = []  # distlm.failures.failure_record, in order
        self.starts = 0  # worker group starts (1 + restarts)
        self.startup: Dict[str, float] = {}  # rank 0's clock on the first start (distlm.worker)
        self.warnings: List[str] = []
        self.beats: Dict[int, Dict[str, Any]] = {}  # each rank's last heartbeat (distlm.failures.Heartbeat)
        self.controller_handle = None  # Ray Train's controller (distlm.failures.controller_callback)

    def put_many(self, records: List[Dict[str, Any]]) -> None:
        self.records.extend(records)

    def drain(self) -> List[Dict[str, Any]]:
        out, self.records = self.records, []
        return out

    def poll(self) -> Dict[str, Any]:
        """The driver's tick: new records and warnings, and whether a rank failed deterministically."""
        warnings, self.warnings = self.warnings, []
        return {"records": self.drain(), "warnings": warnings, "failed": self.deterministic_failure() is not None}

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def put_failure(self, record: Dict[str, Any]) -> None:
        self.failures.append(record)

    def deterministic_failure(self) -> Optional[Dict[str, Any]]:
        return next((f for f in self.failures if f["kind"] == "deterministic"), None)

    def all_failures(self) -> List[Dict[str, Any]]:
        return list(self.failures)

    def put_heartbeat(self, rank: int, beat: Dict[str, Any]) -> None:
        self.beats[rank] = beat

    def heartbeats(self) -> Dict[int, Dict[str, Any]]:
        return dict(self.beats)

    def set_controller(self, handle) -> None:
        self.controller_handle = handle

    def controller(self):
        return self.controller_handle

    def count_start(self) -> None:
        self.starts += 1

    def start_count(self) -> int:
        return self.starts

    def put_startup(self, times: Dict[str, float]) -> None:
        self.startup = self.startup or times  # the first start's: a restart is not a cold start

    def startup_times(self) -> Dict[str, float]:
        return dict(self.startup)

    def put_warning(self, text: str) -> None:
        self.warnings.append(text)

    def put_placement(self, rank: int, info: Dict[str, Any]) -> None:
        self.placement[rank] = info

    def placement_by_rank(self) -> List[Dict[str, Any]]:
        return [self.placement[r] for r in sorted(self.placement)]

    def put_memory(self, rank: int, info: Dict[str, float]) -> None:
        self.memory.setdefault(rank, {}).update(info)

    def memory_by_rank(self) -> List[Dict[str, float]]:
        return [{"rank": r, **self.memory[r]} for r in sorted(self.memory)]


def report_placement(sink, rank: int) -> None:
    """Tell the driver where this rank runs: its Ray node and the process group's rendezvous
    address (MASTER_ADDR: the rank-0 worker's node, set by Ray Train). The driver writes placement.json."""
    if sink is None:
        return
    import os
    import socket

    import ray

    info = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
    }
    sink.put_placement.remote(rank, info)


def memory_now(device: torch.device) -> Dict[str, float]:
    """Bytes this process holds: in live tensors (on a GPU: allocated by torch) and at its peak so
    far (on a CPU: the process's peak resident memory)."""
    if device.type == "cuda":
        return {
            "tensors": float(torch.cuda.memory_allocated(device)),
            "peak": float(torch.cuda.max_memory_allocated(device)),
        }
    import gc
    import resource
    import warnings

    storages = {}
    with warnings.catch_warnings():  # some library objects warn when merely inspected
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return {
        "tensors": float(sum(storages.values())),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
    }


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def keep_heap_small() -> None:
    """Serve every allocation of 4 MB or more (gathered ZeRO-3 parameters, activations) from its
    own mapping, returned to the system when freed. glibc otherwise raises that threshold as
    large blocks are freed and serves them from the heap, where freed memory stays resident:
    a 1B-parameter ZeRO-3 worker grew ~1.7 GB per evaluation that way. No-op without glibc."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops its raising)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): after the model is
    built, after DeepSpeed's set-up, after each evaluation, the resident memory is what is live."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def process_rss() -> float:
    """This process's resident memory now (bytes)."""
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") * 1.0


class StopSignal:
    """Whether the driver asked the run to stop (SIGTERM), polled without blocking the step:
    rank 0 keeps one query to the sink in flight and reports 1.0 once an answer says stop.
    The loop sums the value over ranks with its per-step all-reduce, so every rank stops
    after the same step."""

    # A new query at most this often: one remote call per logged step would cost the step time
    # on a busy machine; the answer is looked for (locally) on every logged step.
    ASK_EVERY_S = 0.2

    def __init__(self, sink, rank: int):
        self.sink = sink if rank == 0 else None
        self.pending = None
        self.asked_at = 0.0

    def poll(self) -> float:
        if self.sink is None:
            return 0.0
        import ray

        if self.pending is not None:
            ready, _ = ray.wait([self.pending], timeout=0)
            if not ready:
                return 0.0
            if ray.get(self.pending):
                return 1.0
            self.pending = None
        if time.monotonic() - self.asked_at >= self.ASK_EVERY_S:
            self.asked_at = time.monotonic()
            self.pending = self.sink.stop_requested.remote()
        return 0.0


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, trials: int = 5) -> float:
    """Achievable matmul FLOP/s on this device with the current thread settings (the MFU
    denominator): the best of several short trials, so a moment of contention from another
    process does not pass for the peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2.0 * n**3 / (time.perf_counter() - start))
    return best
