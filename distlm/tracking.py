"""Experiment tracking: W&B on rank 0, a no-op tracker elsewhere, and the driver's metrics sink.

The loop calls `tracker.log(...)` on every rank; only rank 0 holds a real tracker, so
the loop never branches on rank to log (nanochat's DummyWandb habit).
"""

from __future__ import annotations

import json
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

    def finish(self) -> None:
        pass


class Tracker:
    """Rank 0's tracker: W&B (if enabled) plus a push to the driver's metrics sink."""

    def __init__(self, cfg: TrackingConfig, run_dir: str, run_id: Optional[str], config: Dict[str, Any], sink=None):
        self.sink = sink
        self.wandb = None
        self.run_id = run_id
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
        if self.sink is not None:
            # Fire and forget: the driver writes metrics.jsonl and drives the progress bar.
            self.sink.put.remote({"step": step, **metrics})

    def finish(self) -> None:
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

    def put(self, record: Dict[str, Any]) -> None:
        self.records.append(record)

    def drain(self) -> List[Dict[str, Any]]:
        out, self.records = self.records, []
        return out


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """metrics.jsonl as a list, one record per step: steps re-run after a restart from a
    checkpoint replace the ones logged before the failure."""
    latest: Dict[int, Dict[str, Any]] = {}
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                latest[record["step"]] = record
    return [latest[k] for k in sorted(latest)]


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Achievable matmul FLOP/s on this device with the current thread settings (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iters >= 3:
            return 2.0 * n**3 * iters / elapsed
