"""Run the shards of a preparation: in this process, or as a Ray Data pipeline across the cluster.

Ray Data gets one row per shard (a work unit: files or ranges of files) and tokenizes each in
a `map_batches` task of one CPU, on whichever node has a CPU free; the task reads its
documents, writes its token files to the shared cache and returns only small stats. The
driver never touches the documents, so the corpus can be larger than its memory or disk.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Dict, List, Optional

from distlm.data.corpus import DataError, Unit
from distlm.data.shards import ShardJob, Stats, tokenize_unit


class Progress:
    """Shards, documents, tokens and throughput while it runs: a tqdm bar over input bytes on a
    terminal, a log line every LOG_EVERY_S seconds otherwise (a Slurm or Kubernetes job log)."""

    LOG_EVERY_S = 30.0

    def __init__(self, total_bytes: int, done_bytes: int, total_shards: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.start = self.logged = time.perf_counter()
        self.docs = self.tokens = self.shards = 0
        self.total_shards = total_shards
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(
            desc="tokenizing",
            total=total_bytes,
            initial=done_bytes,
            unit="B",
            unit_scale=True,
            disable=not (enabled and self.tty),
        )

    def shard_done(self, stats: Stats, input_bytes: int) -> None:
        self.shards += 1
        self.docs += sum(stats["docs"].values())
        self.tokens += sum(stats["tokens"].values())
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.bar.set_postfix(docs=f"{self.docs:,}", tokens=f"{self.tokens:,}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(input_bytes)
        if self.enabled and not self.tty and now - self.logged >= self.LOG_EVERY_S:
            self.logged = now
            print(
                f"data: {self.shards}/{self.total_shards} shards, {self.docs:,} documents, {self.tokens:,} tokens, "
                f"{rate:,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def run_shards(
    units: List[Unit], job: ShardJob, engine: str, progress: Progress
) -> tuple[Dict[int, Stats], Dict[str, int]]:
    """Tokenize `units`; returns (stats by unit id, shards written per node)."""
    if not units:
        return {}, {}
    if engine == "ray":
        return _run_ray(units, job, progress)
    results, host = {}, socket.gethostname()
    for unit in units:
        results[unit["id"]] = tokenize_unit(unit, job)  # encode_batch on all of this process's cores
        progress.shard_done(results[unit["id"]], unit["bytes"])
    return results, {host: len(units)}


def _run_ray(units: List[Unit], job: ShardJob, progress: Progress) -> tuple[Dict[int, Stats], Dict[str, int]]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts documents and tokens
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one warning that they are off
    rows = [{"unit": json.dumps(u), "bytes": u["bytes"]} for u in units]
    # One block per unit: each becomes its own task, so every CPU in the cluster takes shards.
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _tokenize_batch, fn_kwargs={"job": job}, batch_size=1, num_cpus=1, batch_format="pyarrow"
    )
    results: Dict[int, Stats] = {}
    nodes: Dict[str, int] = {}
    for row in ds.iter_rows():
        if row["error"]:
            raise DataError(row["error"])
        stats = json.loads(row["stats"])
        results[stats["id"]] = stats
        nodes[row["node"]] = nodes.get(row["node"], 0) + 1
        progress.shard_done(stats, row["bytes"])
    return results, nodes


def _tokenize_batch(batch, job: ShardJob) -> Dict[str, List[Any]]:
    """A Ray Data task: tokenize the batch's units (one, by batch_size=1) on one CPU."""
    import ray

    from distlm.config import ConfigError

    # The task holds one CPU: encode serially rather than on a thread per core of the node.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out: Dict[str, List[Any]] = {"stats": [], "error": [], "node": [], "bytes": []}
    for unit_json, size in zip(batch.column("unit").to_pylist(), batch.column("bytes").to_pylist()):
        error, stats = "", None
        try:
            stats = tokenize_unit(json.loads(unit_json), job)
        except ConfigError as e:  # a bad file: the driver stops with this message (Ray would lose its type)
            error = str(e)
        out["stats"].append(json.dumps(stats))
        out["error"].append(error)
        out["node"].append(ray.util.get_node_ip_address())
        out["bytes"].append(size)
    return out


def connect(ray_init: Optional[Callable[[], None]]) -> int:
    """Start or join Ray (the run's own way when given); returns the cluster's CPU count."""
    import ray

    if not ray.is_initialized():
        if ray_init is not None:
            ray_init()
        else:
            from distlm.runtime import init_ray

            init_ray(None, 1, quiet=True)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


__all__ = ["Progress", "connect", "run_shards"]
