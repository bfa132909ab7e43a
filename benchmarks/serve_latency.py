"""Serving latency and throughput: the Ray Serve endpoint against calling the model in-process.

For concurrency 1 and 16, with batching off (max_batch_size=1) and on (max_batch_size=16),
closed-loop clients (each sends its next request when the previous one is answered) send
the same greedy completion requests to:

  direct    the same ServedModel in this process, behind a FIFO queue and one worker thread
            that decodes up to max_batch_size waiting requests together (no HTTP, no Ray)
  endpoint  `distlm serve`'s Ray Serve deployment over HTTP (POST /v1/completions)

Both use the same torch thread count (--threads, the replica's serve.num_cpus). It prints
p50/p99 latency, requests/s and generated tokens/s, then the ratios: the latency the
endpoint adds over direct calls and the throughput gain of batching at concurrency 16.

    .venv/bin/python benchmarks/serve_latency.py runs/<run>            # a run or export dir
    .venv/bin/python benchmarks/serve_latency.py runs/<run> --requests 32 --max-tokens 16 --out serve.json

Absolute numbers depend on the machine and what else runs on it; compare ratios taken in
one run. The clients run in this process too, on the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, List, Tuple

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "def main(argv):\n",
    "import os\nimport sys\n\n",
    "class Parser(object):\n    def __init__(self",
    "    for i in range(len(",
    "# Copyright (C) 2001 Python Software Foundation\n",
    "def _check_arg(value, name):\n    if not isinstance(",
    "    return self._",
    "try:\n    import ",
]


@dataclass
class Row:
    mode: str
    batching: bool
    concurrency: int
    requests: int
    p50_ms: float
    p99_ms: float
    req_per_s: float
    tokens_per_s: float


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def closed_loop(call: Callable[[str], int], concurrency: int, requests: int) -> Tuple[List[float], int, float]:
    """`concurrency` clients share `requests` calls; returns latencies (s), tokens generated, wall (s)."""
    latencies: List[float] = []
    tokens = [0]
    lock = threading.Lock()
    counter = iter(range(requests))
    start = threading.Barrier(concurrency + 1)

    def client() -> None:
        start.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            n = call(PROMPTS[i % len(PROMPTS)])
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, tokens[0], time.perf_counter() - t0


class DirectServer:
    """The in-process reference: a queue and one worker decoding up to max_batch waiting requests."""

    def __init__(self, model, max_tokens: int) -> None:
        self.model, self.max_tokens, self.max_batch = model, max_tokens, 1
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            results = self.model.generate([request for request, _ in batch])
            for (_, reply), events in zip(batch, results):
                reply.put(len(events))

    def call(self, prompt: str) -> int:
        from distlm.serve.model import GenerationRequest, SamplingParams

        reply: queue.Queue = queue.Queue()
        request = GenerationRequest(self.model.encode(prompt), SamplingParams(self.max_tokens, temperature=0))
        self.queue.put((request, reply))
        return reply.get()


def measure(mode: str, batching: bool, concurrency: int, requests: int, call: Callable[[str], int]) -> Row:
    closed_loop(call, concurrency, min(requests, 2 * concurrency))  # warm-up: allocator, threads, connections
    latencies, tokens, wall = closed_loop(call, concurrency, requests)
    row = Row(
        mode,
        batching,
        concurrency,
        requests,
        1000 * statistics.median(latencies),
        1000 * percentile(latencies, 0.99),
        requests / wall,
        tokens / wall,
    )
    print(
        f"  {mode:8s} batching={'on ' if batching else 'off'} c={concurrency:<3d} p50 {row.p50_ms:8.1f} ms  "
        f"p99 {row.p99_ms:8.1f} ms  {row.req_per_s:7.2f} req/s  {row.tokens_per_s:8.1f} tok/s",
        flush=True,
    )
    return row


def main() -> int:
    from distlm.config import ServeConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="run or export directory (default: the newest runs/*/export)")
    parser.add_argument("--requests", type=int, default=48, help="measured requests per configuration")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size when batching is on")
    parser.add_argument(
        "--batch-wait",
        type=float,
        default=ServeConfig.batch_wait_timeout_s,
        help="the endpoint's batch_wait_timeout_s (the direct worker never waits)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, direct and replica (serve.num_cpus)")
    parser.add_argument("--out", help="also write the rows and ratios as JSON")
    args = parser.parse_args()

    import torch

    from distlm.serve.model import ServedModel, find_export

    path = args.path
    if path is None:
        exports = sorted(REPO.glob("runs/*/export/config.json"), key=lambda p: p.stat().st_mtime)
        if not exports:
            print("no runs/*/export found: train first (distlm train) or pass a run/export directory", file=sys.stderr)
            return 2
        path = str(exports[-1].parent)
    export = find_export(path)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"model {export.path} ({len(export.adapters)} adapters), {args.max_tokens} new tokens per request, greedy")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, torch threads {args.threads}")
    rows: List[Row] = []

    torch.set_num_threads(args.threads)
    direct = DirectServer(ServedModel(export), args.max_tokens)
    for batching in (False, True):
        direct.max_batch = args.batch_size if batching else 1
        for c in levels:
            rows.append(measure("direct", batching, c, args.requests, direct.call))

    import httpx
    import ray
    from ray import serve

    from distlm.serve.server import deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    base = ServeConfig(
        port=port,
        num_cpus=args.threads,
        max_ongoing_requests=max(levels + [args.batch_size]),
        max_queued_requests=1000,
        max_tokens_limit=max(args.max_tokens, 16),
        default_max_tokens=min(args.max_tokens, 16),
    )
    local = threading.local()

    def endpoint_call(prompt: str) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, trust_env=False)
        body = {"model": export.name, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
        r = local.client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    try:
        for batching in (False, True):
            cfg = replace(base, max_batch_size=args.batch_size if batching else 1, batch_wait_timeout_s=args.batch_wait)
            deploy(export, cfg)
            for c in levels:
                rows.append(measure("endpoint", batching, c, args.requests, endpoint_call))
    finally:
        serve.shutdown()
        ray.shutdown()

    def get(mode: str, batching: bool, c: int) -> Row:
        return next(r for r in rows if (r.mode, r.batching, r.concurrency) == (mode, batching, c))

    print()
    print("| mode | batching | concurrency | p50 ms | p99 ms | req/s | tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.mode} | {'on' if r.batching else 'off'} | {r.concurrency} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
            f"| {r.req_per_s:.2f} | {r.tokens_per_s:.1f} |"
        )
    ratios = {}
    lo, hi = min(levels), max(levels)
    for batching in (False, True):
        d, e = get("direct", batching, lo), get("endpoint", batching, lo)
        key = f"batching {'on' if batching else 'off'}, c={lo}"
        ratios[f"added p50 latency, endpoint - direct ({key}), ms"] = e.p50_ms - d.p50_ms
        ratios[f"p50 latency ratio endpoint/direct ({key})"] = e.p50_ms / d.p50_ms
    for mode in ("endpoint", "direct"):
        ratios[f"{mode}: throughput gain of batching at c={hi} (on/off)"] = (
            get(mode, True, hi).tokens_per_s / get(mode, False, hi).tokens_per_s
        )
    for batching in (False, True):
        ratios[f"throughput endpoint/direct at c={hi}, batching {'on' if batching else 'off'}"] = (
            get("endpoint", batching, hi).tokens_per_s / get("direct", batching, hi).tokens_per_s
        )
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
